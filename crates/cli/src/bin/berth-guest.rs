fn main() {
    berth_guest::main()
}
