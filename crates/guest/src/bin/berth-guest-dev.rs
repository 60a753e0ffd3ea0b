//! Development copy of the guest binary, for the sandbox crate's tests.
fn main() {
    berth_guest::main()
}
