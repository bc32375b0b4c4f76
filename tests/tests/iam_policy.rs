//! The IAM policies in `examples/deploy/iam-policy-{registrar,manager,plugins}.json`
//! (each part gets its own, scoped by resource) against the AWS actions warden and
//! its plugins really sent: every end-to-end test's moto_server leaves the actions it
//! recorded (told apart by warden's `app/warden` user agent) in `target/aws-actions/`;
//! this check, run by `scripts/test.sh` after the rest of the suite, fails when one of
//! them is missing from the policy, or when the policy grants an action nothing sent.

use std::collections::BTreeSet;

use warden_tests::harness::aws_actions_dir;
use warden_tests::workspace_root;

const POLICIES: [&str; 3] = [
    "examples/deploy/iam-policy-registrar.json",
    "examples/deploy/iam-policy-manager.json",
    "examples/deploy/iam-policy-plugins.json",
];

/// Actions that AWS does not scope by resource: `Resource: "*"` is allowed for these only.
const UNSCOPABLE: [&str; 7] = [
    "elasticloadbalancing:DescribeLoadBalancers",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetHealth",
    "elasticloadbalancing:DescribeTargetGroupAttributes",
    "ec2:DescribeAvailabilityZones",
    "ec2:DescribeInstances",
    "cloudwatch:GetMetricData",
];

fn policy_actions() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in POLICIES {
        let text = std::fs::read_to_string(workspace_root().join(file)).expect(file);
        let v: serde_json::Value = serde_json::from_str(&text).expect("the policy is JSON");
        for s in v["Statement"].as_array().expect("Statement is a list") {
            assert_eq!(s["Effect"], "Allow", "{file}: only Allow statements: {s}");
            let actions: Vec<String> = match &s["Action"] {
                serde_json::Value::String(a) => vec![a.clone()],
                serde_json::Value::Array(list) => list
                    .iter()
                    .map(|a| a.as_str().expect("an action").to_owned())
                    .collect(),
                other => panic!("{file}: Action must be a string or a list, got {other}"),
            };
            if s["Resource"] == "*" {
                for a in &actions {
                    assert!(
                        UNSCOPABLE.contains(&a.as_str()),
                        "{file}: {a} is granted on every resource; scope it (an ARN pattern or a condition)"
                    );
                }
            }
            out.extend(actions);
        }
    }
    assert!(
        out.iter().all(|a| !a.contains('*')),
        "least privilege: no wildcard actions in {out:?}"
    );
    out
}

fn recorded_actions() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(aws_actions_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        out.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
    }
    out
}

#[test]
#[ignore = "needs the end-to-end tests' recordings: scripts/test.sh runs it after them"]
fn the_policy_grants_every_action_warden_sent_and_nothing_else() {
    let recorded = recorded_actions();
    assert!(
        !recorded.is_empty(),
        "no recordings in {}: run the end-to-end tests first (scripts/test.sh does)",
        aws_actions_dir().display()
    );
    let policy = policy_actions();
    let missing: Vec<_> = recorded.difference(&policy).collect();
    assert!(
        missing.is_empty(),
        "actions warden sent that examples/deploy/iam-policy-*.json do not grant: {missing:?}"
    );
    let unused: Vec<_> = policy.difference(&recorded).collect();
    assert!(
        unused.is_empty(),
        "actions the policy grants that no end-to-end test saw warden send (untested, or not needed): {unused:?}"
    );
    println!(
        "{} actions recorded, all granted: {recorded:?}",
        recorded.len()
    );
}

/// The parser of recordings itself: the policy's own file parses and has no wildcard.
#[test]
fn the_policy_parses_and_names_actions_without_wildcards() {
    let p = policy_actions();
    assert!(p.contains("ecs:RunTask"), "{p:?}");
}

/// The ECS deployment files are what ECS accepts: boto3 checks every field against the
/// API's shapes, moto registers the task definition and creates the daemon service.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn the_ecs_daemon_service_files_are_accepted_by_the_ecs_api() {
    let moto = warden_tests::harness::Moto::start();
    let root = workspace_root().join("examples/deploy");
    let out = moto.fixture(&[
        "deploy",
        root.join("ecs-task-definition.json").to_str().unwrap(),
        root.join("ecs-service.json").to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("fixture prints JSON");
    assert_eq!(v["schedulingStrategy"], "DAEMON", "{out}");
    assert_eq!(
        v["healthCheck"],
        serde_json::json!(["CMD", "/usr/bin/warden", "health"]),
        "{out}"
    );
}
