//! Where the adapter's AWS credentials come from, each mode connecting and round-tripping
//! through a moto server that checks them: this binary starts its own `moto_server`, makes
//! IAM users, access keys and a role in it, then turns on moto's authentication
//! (`/moto-api/reset-auth`), after which moto verifies every call's SigV4 signature against
//! the keys it issued and evaluates IAM policies. So a call succeeds only with the credentials
//! the test meant: that is how each test knows which credentials the adapter used.
//!
//! - `full`: a user whose policy allows SQS and SNS;
//! - `assumer`: a user allowed `sts:AssumeRole` only (SQS with its own keys is refused);
//! - `bus-role`: a role allowing SQS and SNS.
//!
//! Modes: static keys (URL), an assumed role, and in a child process (the test binary run
//! again, with the environment set) a profile (a credentials file written here, named by
//! `profile` or `AWS_PROFILE`) and the default chain (`AWS_ACCESS_KEY_ID`). Wrong keys,
//! a missing profile and a role without permission give typed errors; a distinctive secret
//! key and session token never appear in `Debug`, serialization or errors.
//!
//! Runs when `BUS_TEST_SQS_URL` is set and `moto_server` is installed; with
//! `BUS_REQUIRE_BROKERS=1` a missing `moto_server` fails.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use adapter_sqs::{CredentialsSource, SqsBroker, SqsConfig};
use bus_core::secrets::Secret;
use bus_core::ErrorKind;
use support::{moto_available, round_trip, temp_dir, xml_value, Moto};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/bus-role";
const ALLOW_SQS_SNS: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["sqs:*","sns:*"],"Resource":"*"}]}"#;
const ALLOW_ASSUME: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"sts:AssumeRole","Resource":"*"}]}"#;
const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:user/assumer"},"Action":"sts:AssumeRole"}]}"#;

struct Key {
    id: String,
    secret: String,
}

struct Server {
    moto: Moto,
    full: Key,
    assumer: Key,
    dir: PathBuf,
}

fn server() -> Option<&'static Server> {
    static SERVER: OnceLock<Option<Server>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if !moto_available() {
                return None;
            }
            let dir = temp_dir("credentials");
            let moto = Moto::start(None, &dir.join("moto.log"));
            let iam = |params: &[(&str, &str)]| {
                let mut all = params.to_vec();
                all.push(("Version", "2010-05-08"));
                moto.unsigned_call("iam", &all)
            };
            let user = |name: &str, policy: &str| {
                iam(&[("Action", "CreateUser"), ("UserName", name)]);
                iam(&[
                    ("Action", "PutUserPolicy"),
                    ("UserName", name),
                    ("PolicyName", "p"),
                    ("PolicyDocument", policy),
                ]);
                let key = iam(&[("Action", "CreateAccessKey"), ("UserName", name)]);
                Key {
                    id: xml_value(&key, "AccessKeyId"),
                    secret: xml_value(&key, "SecretAccessKey"),
                }
            };
            let full = user("full", ALLOW_SQS_SNS);
            let assumer = user("assumer", ALLOW_ASSUME);
            iam(&[
                ("Action", "CreateRole"),
                ("RoleName", "bus-role"),
                ("AssumeRolePolicyDocument", TRUST),
            ]);
            iam(&[
                ("Action", "PutRolePolicy"),
                ("RoleName", "bus-role"),
                ("PolicyName", "p"),
                ("PolicyDocument", ALLOW_SQS_SNS),
            ]);
            moto.enforce_authentication();
            Some(Server {
                moto,
                full,
                assumer,
                dir,
            })
        })
        .as_ref()
}

fn static_keys(server: &Server, key: &Key) -> SqsConfig {
    SqsConfig::from_url(&format!(
        "{}&access_key_id={}&secret_access_key={}",
        server.moto.url(),
        key.id,
        url::form_urlencoded::byte_serialize(key.secret.as_bytes()).collect::<String>()
    ))
    .expect("an sqs:// URL")
}

/// moto checks credentials from here on: the dummy ones a local endpoint gets by default are
/// refused, so every success below used the credentials meant.
#[tokio::test]
async fn moto_refuses_unknown_credentials() {
    let Some(server) = server() else { return };
    let config = SqsConfig::from_url(&server.moto.url()).unwrap();
    if config.credentials_source() != CredentialsSource::LocalTest {
        println!("skipped: AWS_ACCESS_KEY_ID or AWS_PROFILE is set in this environment");
        return;
    }
    let err = SqsBroker::connect_with(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(
        err.to_string()
            .contains("authentication failed: InvalidClientTokenId"),
        "{err}"
    );
}

#[tokio::test]
async fn static_keys_round_trip_and_wrong_ones_are_rejected() {
    let Some(server) = server() else { return };
    let config = static_keys(server, &server.full);
    assert_eq!(config.credentials_source(), CredentialsSource::Static);
    round_trip(config).await.expect("round trip with the keys");

    // The right key id with another secret: the signature does not match.
    let wrong = Key {
        id: server.full.id.clone(),
        secret: "Wr0ngSecretKeyZq9".to_owned(),
    };
    let err = SqsBroker::connect_with(static_keys(server, &wrong))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(
        err.to_string()
            .contains("authentication failed: SignatureDoesNotMatch"),
        "{err}"
    );
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("Wr0ngSecretKeyZq9"), "{shown}");

    // A key id moto never issued.
    let unknown = Key {
        id: "AKIAUNKNOWNKEY000000".to_owned(),
        secret: server.full.secret.clone(),
    };
    let err = SqsBroker::connect_with(static_keys(server, &unknown))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(err.to_string().contains("InvalidClientTokenId"), "{err}");
    assert!(!format!("{err} {err:?}").contains(&server.full.secret));
}

/// The secret key given by reference, as a config file names it: from an environment
/// variable and from a file, each round-trips, and serializing the config keeps the reference
/// but not the secret. An unset variable is a `Config` error that names it, before any call.
#[tokio::test]
async fn a_secret_key_by_reference_round_trips() {
    let Some(server) = server() else { return };
    let variable = format!("BUS_TEST_SQS_SECRET_{}", std::process::id());
    std::env::set_var(&variable, &server.full.secret);
    let file = server.dir.join("secret-access-key");
    std::fs::write(&file, format!("{}\n", server.full.secret)).unwrap();
    for reference in [
        serde_json::json!({ "env": variable }),
        serde_json::json!({ "file": file }),
    ] {
        let config: SqsConfig = serde_json::from_value(serde_json::json!({
            "endpoint": server.moto.endpoint(),
            "region": "us-east-1",
            "access_key_id": server.full.id,
            "secret_access_key": reference,
        }))
        .unwrap();
        assert_eq!(config.credentials_source(), CredentialsSource::Static);
        let shown = serde_json::to_string(&config).unwrap();
        assert!(!shown.contains(&server.full.secret), "{shown}");
        let back: SqsConfig = serde_json::from_str(&shown).unwrap();
        assert_eq!(back, config, "{shown}");
        round_trip(config)
            .await
            .expect("round trip with the referenced key");
    }

    let unset = SqsConfig::from_url(&server.moto.url())
        .unwrap()
        .with_credentials(&server.full.id, Secret::env("BUS_TEST_SQS_SECRET_UNSET"));
    let err = SqsBroker::connect_with(unset).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains("BUS_TEST_SQS_SECRET_UNSET"),
        "{err}"
    );
}

/// A user's own keys without the permission: `Rejected` (AccessDenied), not `Config`.
#[tokio::test]
async fn keys_without_permission_are_rejected() {
    let Some(server) = server() else { return };
    let err = SqsBroker::connect_with(static_keys(server, &server.assumer))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(err.to_string().contains("AccessDenied"), "{err}");
}

/// Runs `child` (this binary again) against `url` with `env` as its AWS environment (and
/// no other AWS variable, no profile files unless given, no instance metadata): the
/// environment is the process's, so these modes cannot be tested in this one. `expect` is
/// `ok` for a round trip, else a text the connect error must contain.
fn run_child(server: &Server, url: &str, env: &[(&str, String)], expect: &str) {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command
        .args(["--exact", "child", "--nocapture"])
        .env("BUS_SQS_CHILD_URL", url)
        .env("BUS_SQS_CHILD_EXPECT", expect)
        .env("AWS_CONFIG_FILE", server.dir.join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            server.dir.join("no-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        command.env_remove(var);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "child ({expect}): {text}");
    assert!(text.contains("1 passed"), "the child ran: {text}");
    assert!(
        text.lines().any(|l| l.starts_with("child:")),
        "the child did its work (not skipped): {text}"
    );
    println!(
        "{}",
        text.lines().find(|l| l.starts_with("child:")).unwrap_or("")
    );
}

/// A profile in the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`) named by
/// `profile`: its keys are used; a profile that is not there, or holds a wrong secret, is a
/// `Config` error (not a fall back to other credentials).
#[tokio::test]
async fn a_profile_round_trips_and_a_missing_or_wrong_one_is_a_config_error() {
    let Some(server) = server() else { return };
    let credentials = server.dir.join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[bus-test]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n\n\
             [bus-wrong]\naws_access_key_id = {id}\naws_secret_access_key = Wr0ngProfileSecret\n",
            id = server.full.id,
            secret = server.full.secret,
        ),
    )
    .expect("write the credentials file");
    let files = [(
        "AWS_SHARED_CREDENTIALS_FILE",
        credentials.display().to_string(),
    )];
    let url = |profile: &str| format!("{}&profile={profile}", server.moto.url());
    run_child(server, &url("bus-test"), &files, "ok");
    run_child(server, &url("bus-missing"), &files, "bus-missing");
    run_child(server, &url("bus-wrong"), &files, "SignatureDoesNotMatch");
    // AWS_PROFILE chooses the profile of the default chain.
    let mut with_env = files.to_vec();
    with_env.push(("AWS_PROFILE", "bus-test".to_owned()));
    run_child(server, &server.moto.url(), &with_env, "ok");
}

#[tokio::test]
async fn an_assumed_role_round_trips() {
    let Some(server) = server() else { return };
    // `assumer` alone may not use SQS (keys_without_permission_are_rejected): only the role's
    // credentials can make this work.
    let config = static_keys(server, &server.assumer)
        .with_role(ROLE_ARN)
        .with_role_session_name("bus-credentials-test")
        .with_sts_endpoint(server.moto.endpoint());
    round_trip(config).await.expect("round trip as the role");

    // The role does not trust `full`: no credentials for the role.
    let config = static_keys(server, &server.full)
        .with_role(ROLE_ARN)
        .with_sts_endpoint(server.moto.endpoint());
    let err = SqsBroker::connect_with(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains("AssumeRole: AccessDenied"),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains(&server.full.secret));
    println!("refused AssumeRole: {err}");
}

/// The default chain, from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
#[tokio::test]
async fn the_default_chain_round_trips() {
    let Some(server) = server() else { return };
    let keys = |secret: &str| {
        [
            ("AWS_ACCESS_KEY_ID", server.full.id.clone()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_owned()),
        ]
    };
    run_child(server, &server.moto.url(), &keys(&server.full.secret), "ok");
    run_child(
        server,
        &server.moto.url(),
        &keys("Wr0ngEnvironmentSecret"),
        "SignatureDoesNotMatch",
    );
}

/// The other half of `run_child`: does its work only in the child process, whose environment
/// `run_child` sets; run as an ordinary test it says so and returns.
#[tokio::test]
async fn child() {
    let Ok(url) = std::env::var("BUS_SQS_CHILD_URL") else {
        println!("skipped: child: runs only in the child process that run_child starts");
        return;
    };
    let expect = std::env::var("BUS_SQS_CHILD_EXPECT").expect("the expected outcome");
    let config = SqsConfig::from_url(&url).unwrap();
    let source = if config.profile.is_some() {
        CredentialsSource::Profile
    } else {
        CredentialsSource::DefaultChain
    };
    assert_eq!(config.credentials_source(), source);
    if expect == "ok" {
        round_trip(config).await.expect("round trip");
        println!("child: {source:?} round trip ok");
    } else {
        let err = SqsBroker::connect_with(config).await.unwrap_err();
        // Refused keys are `Rejected`, as a refused login is everywhere; credentials that
        // cannot be found (a missing profile) are `Config`.
        let kind = if expect == "SignatureDoesNotMatch" {
            ErrorKind::Rejected
        } else {
            ErrorKind::Config
        };
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(&expect), "{err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("Wr0ng"), "{shown}");
        println!("child: {source:?} refused: {err}");
    }
}

/// A distinctive secret key and session token through every path: the URL, `Debug`, serde,
/// a failed connect's error (`Display` and `Debug`, whole chain).
#[tokio::test]
async fn secrets_appear_in_no_output() {
    const SECRET: &str = "Zq9SqsSECRETx";
    const TOKEN: &str = "Zq9SqsTOKENx";
    let base = match server() {
        Some(server) => server.moto.url(),
        None => "sqs://127.0.0.1:9?region=us-east-1&connect_timeout_ms=2000".to_owned(),
    };
    let url = format!(
        "{base}&access_key_id=AKIAUNKNOWNKEY000000&secret_access_key={SECRET}&session_token={TOKEN}"
    );
    let config = SqsConfig::from_url(&url).unwrap();
    assert_eq!(config.secret_access_key, Some(SECRET.into()));
    let mut outputs = vec![
        format!("{config:?}"),
        format!("{config:#?}"),
        serde_json::to_string(&config).unwrap(),
        bus_core::secrets::redact_url(&url),
    ];
    let err = SqsBroker::connect_with(config).await.unwrap_err();
    outputs.push(format!("{err}"));
    outputs.push(format!("{err:?}"));
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        outputs.push(format!("{e} {e:?}"));
        source = e.source();
    }
    for output in &outputs {
        assert!(!output.contains(SECRET), "{output}");
        assert!(!output.contains(TOKEN), "{output}");
    }
    // A bad URL's error says nothing of the secret either.
    let err = SqsConfig::from_url(&format!("{url}&wait_time_secs=x")).unwrap_err();
    assert!(!format!("{err} {err:?}").contains(SECRET));
}
