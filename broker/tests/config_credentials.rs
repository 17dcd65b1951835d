//! Config TOML and credential file behaviour (no sockets).

use coevo_broker::{generate_password, hash_password, BrokerConfig, BrokerError, Credentials};

#[test]
fn config_defaults_and_round_trip() {
    let default = BrokerConfig::default();
    assert_eq!(default.listen.to_string(), "127.0.0.1:1883");
    assert_eq!(default.max_payload_bytes, 1024 * 1024 + 64 * 1024);
    assert_eq!(
        BrokerConfig::from_toml_str("").expect("empty is default"),
        default
    );

    let config = BrokerConfig {
        listen: "0.0.0.0:18830".parse().expect("addr"),
        max_connections: 42,
        credentials: Some("creds.toml".into()),
        ..BrokerConfig::default()
    };
    let text = config.to_toml_string().expect("serialise");
    assert_eq!(BrokerConfig::from_toml_str(&text).expect("parse"), config);
}

#[test]
fn config_unknown_field_and_bad_values_are_errors() {
    let err = BrokerConfig::from_toml_str("max_conections = 5\n").expect_err("typo rejected");
    assert!(
        matches!(&err, BrokerError::Config(m) if m.contains("max_conections")),
        "{err}"
    );
    assert!(matches!(
        BrokerConfig::from_toml_str("max_segment_size = 10\n"),
        Err(BrokerError::Config(_))
    ));
    assert!(matches!(
        BrokerConfig::from_toml_str("max_segment_count = 0\n"),
        Err(BrokerError::Config(_))
    ));
    assert!(matches!(
        BrokerConfig::from_toml_str("connection_timeout_ms = 70000\n"),
        Err(BrokerError::Config(_))
    ));
}

#[test]
fn sample_config_parses_and_matches_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.sample.toml");
    let config = BrokerConfig::from_toml_file(&path).expect("sample parses");
    assert_eq!(config, BrokerConfig::default());
}

#[test]
fn config_file_resolves_relative_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "credentials = \"creds.toml\"\n").expect("write");
    let config = BrokerConfig::from_toml_file(&path).expect("parse");
    assert_eq!(config.credentials, Some(dir.path().join("creds.toml")));
}

#[test]
fn credentials_save_load_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("creds.toml");
    let mut creds = Credentials::default();
    let pw = generate_password();
    assert_eq!(pw.len(), 24);
    assert!(pw.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(pw, generate_password());
    creds.set_password("cam-001", &pw).expect("hash");
    creds.set_password("cam-002", "other").expect("hash");
    creds.save(&path).expect("save");

    let text = std::fs::read_to_string(&path).expect("read");
    assert!(!text.contains(&pw), "plaintext must never be stored");
    assert!(text.contains("$argon2id$"));

    let loaded = Credentials::load(&path).expect("load");
    assert_eq!(loaded, creds);
    assert!(loaded.check("cam-001", "cam-001", &pw));
    assert!(!loaded.check("cam-001", "cam-001", "nope"));
    assert!(!loaded.check("cam-001", "cam-002", &pw));
    assert!(!loaded.check("cam-002", "cam-002", &pw));
    assert!(!loaded.check("cam-404", "cam-404", &pw));

    let mut loaded = loaded;
    assert!(loaded.remove("cam-002"));
    assert!(!loaded.remove("cam-002"));
    loaded.save(&path).expect("overwrite");
    assert_eq!(Credentials::load(&path).expect("reload").clients.len(), 1);
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
}

#[test]
fn credentials_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    match Credentials::load(&missing) {
        Err(BrokerError::Credentials(m)) => assert!(m.contains("missing.toml"), "{m}"),
        other => panic!("expected Credentials error, got {other:?}"),
    }
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "[clients]\n\"cam-1\" = \"hunter2\"\n").expect("write");
    assert!(matches!(
        Credentials::load(&plain),
        Err(BrokerError::Credentials(_))
    ));
    let h = hash_password("x").expect("hash");
    assert!(h.starts_with("$argon2id$v=19$"));
}
