//! Services defined cluster-wide in Redis (`redis-services`), followed live: by the
//! registrar (routes read back from the local Redis, with real Docker containers) and by
//! the manager (`[[manager.sources]]`, tasks counted in moto).

use std::time::Duration;

use redis::Commands;
use warden_tests::harness::*;

fn get(redis: &Redis, key: &str) -> Option<String> {
    redis.conn().get(key).unwrap()
}

/// A service written into the hash is routed without a restart; a malformed entry is
/// skipped and named while the good one stays; the services Redis going away keeps the
/// last good set; deleting the entry takes the route away.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn services_in_redis_are_routed_live_and_a_bad_entry_or_a_lost_redis_costs_nothing() {
    let local = Redis::start();
    let mut central = Redis::start();
    let config = format!(
        "[host]\ninstance_id = \"i-rsvc\"\n[registrar]\nlocal_redis = \"{}\"\n\
         [[registrar.sources]]\nplugin = \"redis-services\"\n\
         config = {{ url = \"{}\", refresh_ms = 200 }}\n",
        local.url(),
        central.url()
    );
    let w = Warden::start(&config, &[]);
    let cs = Containers::new("rsvc");
    let id = cs.run("web", &[], &[]);
    let server = format!("{}:80", cs.ip(&id, "bridge"));
    let tag = format!("warden-test={}", cs.tag);
    let (k, v) = tag.split_once('=').unwrap();
    let web = serde_json::json!({"match": {"labels": {k: v}}, "port": 80,
                                 "frontends": ["rsvc.example"]});
    let _: () = central
        .conn()
        .hset("warden:services", "rsvc-web", web.to_string())
        .unwrap();
    eventually(Duration::from_secs(20), "the route from Redis", || {
        (get(&local, "frontend:rsvc.example").as_deref() == Some("rsvc-web")).then_some(())
    });
    let servers: Vec<String> = local.conn().hkeys("backend:rsvc-web").unwrap();
    assert_eq!(servers, vec![server.clone()]);

    // A malformed entry is skipped with one warning naming it; the good one stays.
    let _: () = central
        .conn()
        .hset(
            "warden:services",
            "broken",
            r#"{"match": {"image": "x"}, "prot": 1}"#,
        )
        .unwrap();
    let line = wait_log(
        &w,
        "the skipped entry named",
        &["service entry skipped", "broken"],
    );
    assert!(line.contains("unknown key `prot`"), "{line}");
    assert_eq!(
        get(&local, "frontend:rsvc.example").as_deref(),
        Some("rsvc-web")
    );

    // The services Redis goes away: the last good set is kept, and still used: a
    // container started now joins the service.
    central.stop();
    wait_log(
        &w,
        "the read failure said",
        &["cannot read the services hash"],
    );
    let id2 = cs.run("web2", &[], &[]);
    let server2 = format!("{}:80", cs.ip(&id2, "bridge"));
    eventually(Duration::from_secs(20), "the second server routed", || {
        let servers: Vec<String> = local.conn().hkeys("backend:rsvc-web").unwrap();
        (servers.len() == 2 && servers.contains(&server2)).then_some(())
    });
    assert_eq!(
        get(&local, "frontend:rsvc.example").as_deref(),
        Some("rsvc-web")
    );

    // Back (empty: the test's Redis keeps nothing) and written again, then the entry
    // deleted: the route goes.
    central.restart();
    let _: () = central
        .conn()
        .hset("warden:services", "rsvc-web", web.to_string())
        .unwrap();
    wait_log(&w, "the recovery said", &["services hash readable again"]);
    eventually(Duration::from_secs(20), "the route back", || {
        (get(&local, "frontend:rsvc.example").as_deref() == Some("rsvc-web")).then_some(())
    });
    let _: () = central.conn().hdel("warden:services", "rsvc-web").unwrap();
    eventually(Duration::from_secs(20), "the route removed", || {
        get(&local, "frontend:rsvc.example").is_none().then_some(())
    });
    let log = w.log_text();
    assert_eq!(
        log.matches("service entry skipped").count(),
        1,
        "the bad entry is named once: {log}"
    );
}

fn running(moto: &Moto) -> u32 {
    moto.fixture(&["ecs-count", "c1", "web", "warden-web"])
        .parse()
        .unwrap()
}

/// A service whose definition in Redis has a `manage` part is scaled by the leader
/// (tasks counted in moto); a change of it is followed without a restart; a wrong one
/// is skipped with the source, the service and the key named.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_managed_service_defined_in_redis_is_scaled_and_followed_live() {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    std::fs::write(&metric, "5").unwrap();
    let config = format!(
        "[host]\ninstance_id = \"i-msrc\"\n[registrar]\nenabled = false\n\
         [manager]\ncentral_redis = \"{url}\"\nloop_secs = 1\n\
         [[manager.sources]]\nplugin = \"redis-services\"\n\
         config = {{ url = \"{url}\", refresh_ms = 200 }}\n\
         [metrics.m]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [\"file:{}\"] }}\n",
        metric.display(),
        url = central.url(),
    );
    let w = Warden::start(&config, &moto.env());
    let manage = |max: u32| {
        serde_json::json!({"match": {"image": "web"}, "manage": {
            "cluster": "c1", "task_definition": "web", "metric": "m",
            "mapping": {"target_per_task": 1.0},
            "policy": {"max": max, "scale_down_window_secs": 0}}})
        .to_string()
    };
    let _: () = central
        .conn()
        .hset("warden:services", "web", manage(10))
        .unwrap();
    eventually(Duration::from_secs(30), "5 tasks in moto", || {
        (running(&moto) == 5).then_some(())
    });
    let _: () = central
        .conn()
        .hset("warden:services", "web", manage(2))
        .unwrap();
    eventually(Duration::from_secs(30), "2 tasks in moto", || {
        (running(&moto) == 2).then_some(())
    });
    let bad = serde_json::json!({"match": {"image": "api"}, "manage": {
        "task_definition": "api", "metric": "nope", "mapping": {"target_per_task": 1.0}}});
    let _: () = central
        .conn()
        .hset("warden:services", "api", bad.to_string())
        .unwrap();
    let line = wait_log(
        &w,
        "the skipped service named",
        &["managed service skipped"],
    );
    assert!(
        line.contains("manager.sources[0] service \\\"api\\\": manage.metric: no [metrics.nope]"),
        "{line}"
    );
    assert_eq!(running(&moto), 2);
}

/// Services from a DynamoDB table laid out as the original warden planned (moto): an
/// original-style item is routed; an item added later is routed without a restart; a
/// malformed item is skipped and named by its key; a read failure (the table gone)
/// keeps the last good set, which still routes a container started afterwards.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn services_in_dynamodb_are_routed_live_and_a_read_failure_keeps_the_last_good_set() {
    let local = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ddb-table", "service-description"]);
    let put = |item: serde_json::Value| {
        moto.fixture(&["ddb-put", "service-description", &item.to_string()]);
    };
    put(
        serde_json::json!({"Id": "1", "Name": "ddb-web", "BackendName": "ddb-backend",
        "ContainerName": IMAGE, "LoadBalancerUrl": "ddb.example", "Site": "/",
        "Port": 80, "TaskName": "web", "TaskVersion": "1",
        // Warden's own key wins: only the containers labelled for this service.
        "match": {"image": IMAGE, "labels": {"svc": "ddb-web"}}}),
    );
    let config = format!(
        "[host]\ninstance_id = \"i-ddb\"\n[registrar]\nlocal_redis = \"{}\"\n\
         [[registrar.sources]]\nplugin = \"dynamodb-services\"\nconfig = {{ refresh_secs = 1 }}\n\
         env = [\"AWS_ENDPOINT_URL\", \"AWS_REGION\", \"AWS_ACCESS_KEY_ID\", \"AWS_SECRET_ACCESS_KEY\", \"AWS_EC2_METADATA_DISABLED\"]\n",
        local.url()
    );
    // Not shipped with warden, the plugin runs in a process of its own (the default
    // `isolation = "auto"`), which gets only the variables its `env` names.
    let w = Warden::start(&config, &moto.env());
    let cs = Containers::new("ddb");
    let id = cs.run("web", &[("svc", "ddb-web")], &[]);
    let server = format!("{}:80", cs.ip(&id, "bridge"));
    eventually(Duration::from_secs(30), "the route from DynamoDB", || {
        let servers: Vec<String> = local.conn().hkeys("backend:ddb-backend").unwrap();
        (get(&local, "frontend:ddb.example").as_deref() == Some("ddb-backend")
            && servers == vec![server.clone()])
        .then_some(())
    });

    // Added while warden runs, in warden's own model.
    put(
        serde_json::json!({"Id": "api", "match": {"labels": {"svc": "ddb-api"}},
        "port": 80, "frontends": ["api.ddb.example/v1"]}),
    );
    cs.run("api", &[("svc", "ddb-api")], &[]);
    eventually(Duration::from_secs(30), "the added service routed", || {
        (get(&local, "frontend:api.ddb.example/v1/").as_deref() == Some("api")).then_some(())
    });

    // A malformed item: skipped, named by its key, the others kept.
    put(
        serde_json::json!({"Id": "broken-7", "Name": "broken", "ContainerName": "x",
        "frontend_prot": 1}),
    );
    let line = wait_log(
        &w,
        "the skipped item named",
        &["service item skipped", "broken-7"],
    );
    assert!(line.contains("frontend_prot"), "{line}");
    assert_eq!(
        get(&local, "frontend:ddb.example").as_deref(),
        Some("ddb-backend")
    );

    // The table gone: the read fails, the last good set stays and still routes.
    moto.fixture(&["ddb-drop", "service-description"]);
    let line = wait_log(
        &w,
        "the read failure said",
        &["cannot read the services table"],
    );
    assert!(line.contains("ResourceNotFoundException"), "{line}");
    let id2 = cs.run("web2", &[("svc", "ddb-web")], &[]);
    let server2 = format!("{}:80", cs.ip(&id2, "bridge"));
    eventually(
        Duration::from_secs(30),
        "the second container routed",
        || {
            let servers: Vec<String> = local.conn().hkeys("backend:ddb-backend").unwrap();
            servers.contains(&server2).then_some(())
        },
    );
    assert_eq!(
        get(&local, "frontend:api.ddb.example/v1/").as_deref(),
        Some("api")
    );
    assert_eq!(
        w.log_text().matches("service item skipped").count(),
        1,
        "the malformed item is named once"
    );
}

/// A service source whose `list` never returns, in process: its last good services keep
/// their routes, and the registrar loop goes on: a container of another source started
/// after the wedge is routed, and the wedged source is created again in a process.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_source_that_never_returns_keeps_its_routes_and_the_registrar_goes_on() {
    let local = Redis::start();
    let cs = Containers::new("wedge");
    let tag = format!("warden-test={}", cs.tag);
    let (k, v) = tag.split_once('=').unwrap();
    let first = cs.run("first", &[("svc", "wedged-src")], &[]);
    let server = format!("{}:80", cs.ip(&first, "bridge"));
    let defined = serde_json::json!({"name": "wedge-web", "match": {"labels": {k: v, "svc": "wedged-src"}},
                                     "port": 80, "frontends": ["wedge.example"]});
    let config = format!(
        "[host]\ninstance_id = \"i-wedge\"\n[plugins]\ncall_timeout_ms = 300\n\
         [registrar]\nlocal_redis = \"{}\"\n\
         [[registrar.sources]]\nplugin = \"test-chaos\"\nisolation = \"in-process\"\n\
         config = {{ sequence = [\"ok\", \"spin\"], services = [{}] }}\n\
         [[registrar.sources]]\nplugin = \"docker-labels\"\n",
        local.url(),
        toml_inline(&defined)
    );
    let w = Warden::start(&config, &[]);
    eventually(Duration::from_secs(20), "the first route", || {
        (get(&local, "frontend:wedge.example").as_deref() == Some("wedge-web")).then_some(())
    });
    // The next list spins: the source wedges and is created again in a process.
    wait_log(&w, "the wedge said", &["\"ERROR\"", "wedged", "test-chaos"]);
    wait_log(
        &w,
        "created again",
        &["plugin instance created (process)", "test-chaos"],
    );
    let second = cs.run(
        "second",
        &[
            ("warden.service", "wedge-other"),
            ("warden.frontend", "other.wedge.example"),
        ],
        &[],
    );
    let other = format!("{}:80", cs.ip(&second, "bridge"));
    eventually(Duration::from_secs(20), "the other source's route", || {
        let servers: Vec<String> = local.conn().hkeys("backend:wedge-other").unwrap();
        (get(&local, "frontend:other.wedge.example").as_deref() == Some("wedge-other")
            && servers == vec![other.clone()])
        .then_some(())
    });
    assert_eq!(
        get(&local, "frontend:wedge.example").as_deref(),
        Some("wedge-web")
    );
    let servers: Vec<String> = local.conn().hkeys("backend:wedge-web").unwrap();
    assert_eq!(servers, vec![server]);
}

/// A JSON object as a TOML inline table.
fn toml_inline(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{:?} = {}", k, toml_inline(v)))
                .collect();
            format!("{{ {} }}", parts.join(", "))
        }
        serde_json::Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(toml_inline).collect();
            format!("[{}]", parts.join(", "))
        }
        other => other.to_string(),
    }
}
