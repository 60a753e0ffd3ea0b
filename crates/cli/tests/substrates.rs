//! Choosing the substrate: per agent in `berth.toml`, the server's default,
//! a per-tenant minimum, and refusal of a substrate the host cannot run.
//! The gVisor and microVM paths run real runsc and real QEMU guests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};

/// The microVM kernel the test script built (scripts/build-kernel).
fn kernel() -> String {
    let k = std::env::var("BERTH_TEST_KERNEL")
        .unwrap_or_else(|_| "/var/cache/berth-ci/kernel/vmlinux".to_owned());
    assert!(
        std::path::Path::new(&k).exists(),
        "no guest kernel at {k}: run scripts/build-kernel /var/cache/berth-ci/kernel"
    );
    k
}

fn all_substrates(extra: &str) -> String {
    format!(
        "substrates = [\"process\", \"gvisor\", \"microvm\"]\n{extra}\n[microvm]\nkernel = \"{}\"\naccel = \"tcg\"\n",
        kernel()
    )
}

fn manifest(name: &str, isolation: Option<&str>) -> String {
    let iso = isolation.map_or(String::new(), |i| format!("isolation = \"{i}\"\n"));
    format!("name = \"{name}\"\nentrypoint = [\"python3\", \"main.py\"]\n{iso}")
}

async fn events(c: &reqwest::Client, s: &Server, session: &str) -> Vec<Value> {
    let v = get_json(
        c,
        s,
        &s.admin_key,
        &format!("/v1/sessions/{session}/events"),
    )
    .await;
    v["events"].as_array().unwrap().clone()
}

async fn substrate_of(c: &reqwest::Client, s: &Server, session: &str) -> String {
    let evs = events(c, s, session).await;
    let started = evs
        .iter()
        .find(|e| e["event"]["type"] == "sandbox_started")
        .expect("a sandbox_started event");
    started["event"]["substrate"].as_str().unwrap().to_owned()
}

/// Deploys `counter` under `name` on `isolation`, then checks that the
/// turns of one session reach one sandbox of that substrate and a second
/// session gets a fresh one.
async fn counter_on(s: &Server, name: &str, isolation: Option<&str>, expect: &str) {
    s.deploy_example("counter", Some(&manifest(name, isolation)));
    let c = s.client();
    let (a, b) = (sid("sub-a"), sid("sub-b"));
    for n in 1..=3 {
        let r = invoke(&c, s, &s.admin_key, name, &a, json!({})).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        assert_eq!(r.json::<Value>().await.unwrap()["count"], n);
    }
    let r = invoke(&c, s, &s.admin_key, name, &b, json!({})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["count"], 1);
    assert_eq!(substrate_of(&c, s, &a).await, expect);
    for id in [&a, &b] {
        let r = c
            .delete(format!("{}/v1/sessions/{id}", s.url))
            .bearer_auth(&s.admin_key)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
}

#[tokio::test]
async fn tenant_policy_refuses_weaker_substrates() {
    let s = Server::start_with("[isolation]\nrequire = { strict = \"microvm\" }\n");
    s.deploy_example("echo", None);
    let strict = s.create_key("strict", "alice", true);
    let c = s.client();
    let session = sid("strict");
    let r = invoke(&c, &s, &strict, "echo", &session, json!({"x": 1})).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "isolation_policy", "{v}");
    // Refused before anything was created.
    let r = c
        .get(format!("{}/v1/sessions/{session}", s.url))
        .bearer_auth(&strict)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Another tenant is not bound by it.
    let r = invoke(&c, &s, &s.admin_key, "echo", &sid("free"), json!({})).await;
    assert_eq!(r.status(), 200);
    // The server says what it runs and what the caller's tenant needs.
    let v = get_json(&c, &s, &strict, "/v1/substrates").await;
    assert_eq!(v["default"], "process");
    assert_eq!(v["tenant_requires"], "microvm");
    let subs = v["substrates"].as_array().unwrap();
    let process = subs.iter().find(|x| x["substrate"] == "process").unwrap();
    assert_eq!(process["available"], true);
    let vm = subs.iter().find(|x| x["substrate"] == "microvm").unwrap();
    assert_eq!(vm["available"], false);
    assert!(vm["detail"].as_str().unwrap().contains("disabled"), "{vm}");
    // Deploying an agent on a substrate this server does not run fails.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples().join("echo"), dir.path());
    std::fs::write(
        dir.path().join("berth.toml"),
        manifest("echo-vm", Some("microvm")),
    )
    .unwrap();
    let out = s
        .cli()
        .args(["deploy", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    let all =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(all.contains("substrate_unavailable"), "{all}");
}

#[tokio::test]
async fn gvisor_agent_runs_end_to_end() {
    let s = Server::start_with(&all_substrates(""));
    counter_on(&s, "counter-gv", Some("gvisor"), "gvisor").await;
}

#[tokio::test]
async fn microvm_agent_runs_end_to_end() {
    let s = Server::start_with(&all_substrates(""));
    counter_on(&s, "counter-vm", Some("microvm"), "microvm").await;
    // Without a snapshot every session boots its own VM.
    let m = format!(
        "{}snapshot = false\n",
        manifest("counter-boot", Some("microvm"))
    );
    s.deploy_example("counter", Some(&m));
    let c = s.client();
    let id = sid("boot");
    let r = invoke(&c, &s, &s.admin_key, "counter-boot", &id, json!({})).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(substrate_of(&c, &s, &id).await, "microvm");
}

#[tokio::test]
async fn server_default_substrate_applies_to_agents_that_name_none() {
    let s = Server::start_with(&all_substrates("[isolation]\ndefault = \"gvisor\"\n"));
    counter_on(&s, "counter-default", None, "gvisor").await;
    // An agent that names its substrate keeps it.
    counter_on(&s, "counter-proc", Some("process"), "process").await;
}

#[tokio::test]
async fn doctor_reports_each_substrate_and_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[microvm]\nkernel = \"{}\"\n[gvisor]\nrunsc = \"/nonexistent/runsc\"\n",
            dir.path().join("data").display(),
            kernel()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(berth_bin())
        .args(["doctor", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let subs = v["substrates"].as_array().unwrap();
    let by = |name: &str| {
        subs.iter()
            .find(|s| s["substrate"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(by("process")["available"], true);
    // A runsc that is not there: unavailable, and the reason says so.
    let gv = by("gvisor");
    assert_eq!(gv["available"], false, "{gv}");
    assert!(gv["detail"].as_str().unwrap().contains("runsc"), "{gv}");
    // KVM does not work on these machines: the probe falls back to TCG.
    let vm = by("microvm");
    assert_eq!(vm["available"], true, "{vm}");
    let detail = vm["detail"].as_str().unwrap();
    assert!(
        detail.contains("QEMU") && detail.contains(&kernel()),
        "{vm}"
    );
    assert!(detail.contains("kvm") || detail.contains("tcg"), "{vm}");
}
