//! What can be checked of deploy/ without Docker or Kubernetes: the files parse, the
//! manifests have the expected kinds and settings, and the units are complete.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

#[test]
fn the_compose_file_has_every_service_and_mounts_existing_configs() {
    let docs = load("compose.yaml");
    let services = &docs[0]["services"];
    for name in ["postgres", "kafka", "shop", "orders-db", "orders", "proxy", "cdc", "sink"] {
        assert!(!services[name].is_badvalue(), "service {name} missing");
    }
    let postgres = format!("{:?}", services["postgres"]["command"]);
    assert!(postgres.contains("wal_level=logical"), "{postgres}");
    assert_eq!(
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller"),
        "KRaft"
    );
    for name in ["proxy", "cdc", "sink"] {
        let volume = services[name]["volumes"][0].as_str().expect("volume");
        let host = volume.split(':').next().expect("host path");
        assert!(deploy(host).is_dir(), "{name} mounts {host}, which does not exist");
    }
    assert!(
        deploy("compose/routes.toml").exists()
            && deploy("compose/proxy.toml").exists()
            && deploy("compose/cdc.toml").exists()
            && deploy("compose/sink.toml").exists()
    );
}

#[test]
fn the_kubernetes_manifests_have_the_expected_kinds() {
    let kustomization = &load("k8s/kustomization.yaml")[0];
    let mut kinds = Vec::new();
    for resource in kustomization["resources"].as_vec().expect("resources") {
        for doc in load(&format!("k8s/{}", resource.as_str().expect("path"))) {
            kinds.push((
                doc["kind"].as_str().expect("kind").to_string(),
                doc["metadata"]["name"].as_str().expect("name").to_string(),
            ));
            if doc["kind"].as_str() == Some("Deployment") {
                let spec = &doc["spec"]["template"]["spec"]["containers"][0];
                assert!(
                    !spec["readinessProbe"].is_badvalue() && !spec["livenessProbe"].is_badvalue(),
                    "{:?}",
                    doc["metadata"]["name"]
                );
            }
        }
    }
    for expected in [
        ("Namespace", "ficus"),
        ("Deployment", "ficus-proxy"),
        ("Service", "ficus-proxy"),
        ("PodDisruptionBudget", "ficus-proxy"),
        ("NetworkPolicy", "ficus-proxy"),
        ("Deployment", "ficus-cdc"),
        ("Deployment", "ficus-sink"),
    ] {
        assert!(
            kinds.iter().any(|(k, n)| k == expected.0 && n == expected.1),
            "{expected:?} missing from {kinds:?}"
        );
    }
    let cdc = load("k8s/cdc.yaml");
    assert_eq!(cdc[0]["spec"]["replicas"].as_i64(), Some(2), "an active reader and a standby");
    let proxy = load("k8s/proxy.yaml");
    assert!(proxy[0]["spec"]["replicas"].as_i64() > Some(1));
    let mount = &proxy[0]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0];
    assert!(mount["subPath"].is_badvalue(), "a subPath mount never sees ConfigMap updates");
    let generators = kustomization["configMapGenerator"].as_vec().expect("generators");
    let routes = generators
        .iter()
        .find(|g| g["name"].as_str() == Some("ficus-routes"))
        .expect("routes ConfigMap");
    assert_eq!(routes["options"]["disableNameSuffixHash"].as_bool(), Some(true));
    let secrets = kustomization["secretGenerator"].as_vec().expect("secrets");
    for secret in ["ficus-cdc-database", "ficus-sink-database"] {
        assert!(secrets.iter().any(|s| s["name"].as_str() == Some(secret)), "{secret}");
    }
    for file in ["routes.toml", "cdc.toml", "sink.toml"] {
        assert!(deploy(&format!("k8s/{file}")).exists());
    }
}

#[test]
fn the_systemd_units_reload_with_sighup_and_are_sandboxed() {
    for unit in ["ficus-proxy.service", "ficus-cdc.service"] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).expect("unit");
        for line in [
            "ExecReload=/bin/kill -HUP $MAINPID",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "DynamicUser=yes",
            "[Install]",
        ] {
            assert!(text.contains(line), "{unit} lacks {line}");
        }
        assert!(text.lines().any(|l| l.starts_with("ExecStart=/usr/local/bin/ficus ")), "{unit}");
    }
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_as_a_user() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).expect("Dockerfile");
    assert!(
        text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(text.contains("COPY --from=build"));
    assert!(text.contains("USER 10001"));
    assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/ficus\"]"));
}
