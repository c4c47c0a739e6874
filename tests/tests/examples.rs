//! The example manifests that the demo runs, checked against the agent's own loader.
//!
//! Those under deploy/examples/ are read without a skipped object, and program
//! what the seeds describe.
use std::{collections::BTreeMap, path::PathBuf};

use lb_tests::cluster::{NODE_IP, kubia_manifests, ready};
use lb_userspace::{
    model::{
        ServicePortName,
        kubernetes::{desired_state, desired_state_on},
    },
    source::manifests::ManifestDir,
};

fn programmed(state: &lb_userspace::model::DesiredState) -> BTreeMap<String, Vec<String>> {
    state
        .services
        .iter()
        .map(|(name, port)| (name.to_string(), port.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()))
        .collect()
}

#[test]
fn examples_program_the_seeds_services() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let update = ManifestDir::new(dir).load().expect("the examples load");
    assert!(update.skipped.is_empty(), "{:?}", update.skipped);
    let computed = desired_state_on(&update.objects, "node-1", &[NODE_IP.into()]);
    assert!(computed.skipped.is_empty(), "{:?}", computed.skipped);
    let kubia: Vec<String> = (1..=3).map(|i| format!("10.244.{i}.2:8080")).collect();
    let dns: Vec<String> = (1..=3).map(|i| format!("10.244.{i}.2:5353")).collect();
    let expected = BTreeMap::from([
        ("default/external-service".to_owned(), vec!["11.11.11.11:80".to_owned(), "22.22.22.22:80".to_owned()]),
        ("default/kubia:dns".to_owned(), dns),
        ("default/kubia:http".to_owned(), kubia.clone()),
        ("default/kubia-nodeport".to_owned(), kubia.clone()),
        ("default/kubia-nodeport/external".to_owned(), kubia.clone()),
        ("default/kubia-loadbalancer".to_owned(), kubia.clone()),
        ("default/kubia-loadbalancer/external".to_owned(), kubia),
        ("default/no-endpoints:dns".to_owned(), vec![]),
        ("default/no-endpoints:http".to_owned(), vec![]),
    ]);
    assert_eq!(programmed(&computed.state), expected);
    let external_frontends = |name: &str| -> Vec<String> {
        let port = &computed.state.services[&ServicePortName::new("default", name, "").to_external()];
        port.frontends.iter().map(|f| format!("{}:{}", f.ip, f.port)).collect()
    };
    assert_eq!(external_frontends("kubia-nodeport"), ["10.201.0.1:30123"], "the seeds' node port");
    assert_eq!(external_frontends("kubia-loadbalancer"), ["10.201.0.1:31234", "10.202.0.100:80"]);
}

/// The demo replaces the example kubia.yaml with generated ones as pods
/// change: with all three pods ready, they must program the same.
#[test]
fn generated_kubia_manifests_match_the_example() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let example = ManifestDir::new(dir).load().expect("the examples load");
    let from_example = programmed(&desired_state(&example.objects, "node-1").state);

    let generated_dir = std::env::temp_dir().join(format!("lb-examples-test-{}", std::process::id()));
    std::fs::create_dir_all(&generated_dir).expect("temp dir");
    std::fs::write(generated_dir.join("kubia.yaml"), kubia_manifests(&ready(&[0, 1, 2]))).expect("write");
    let generated = ManifestDir::new(generated_dir.clone()).load();
    let _ = std::fs::remove_dir_all(&generated_dir);
    let from_generated = programmed(&desired_state(&generated.expect("loads").objects, "node-1").state);
    for port in ["default/kubia:http", "default/kubia:dns", "default/no-endpoints:http"] {
        assert_eq!(from_generated.get(port), from_example.get(port), "{port}");
    }
}
