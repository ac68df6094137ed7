//! The config path end to end, over real processes and sockets: a real control plane
//! on a mesh file, a real proxy, and what the proxy holds and shows.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use neutrino_tests::*;

const SECOND: Duration = Duration::from_secs(1);

fn cpu_base(_: usize) -> u32 {
    1000
}

#[tokio::test]
async fn initial_sync_delivers_every_resource_at_the_control_planes_versions() {
    let mesh = MeshFile::new(&mesh_yaml(3, &cpu_base));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;

    let cp_dump = get_json(cp.admin, "/config_dump").await.unwrap();
    let dump = proxy.dump().await;
    for kind in ["Service", "Endpoints", "Capacity"] {
        let theirs = cp_dump["resources"][kind].as_object().unwrap();
        assert_eq!(theirs.len(), 3, "{kind}");
        for (name, v) in theirs {
            assert_eq!(version(&dump, kind, name).as_deref(), v.as_str(), "{kind} {name}");
        }
    }
    let body = &dump["resources"]["Endpoints"]["default/svc-1"]["body"]["Endpoints"]["endpoints"][0];
    assert_eq!(body["address"], "10.1.0.1");
    assert_eq!(body["capacity"]["cpu_millis"], 1000);
    assert_eq!(body["capacity"]["memory_bytes"], 1u64 << 30);
    assert_eq!(dump["stream"]["state"], "connected");

    // The control plane sees the proxy and what it acknowledged.
    let cp_dump = get_json(cp.admin, "/config_dump").await.unwrap();
    let p = &cp_dump["proxies"][0];
    assert_eq!(p["node_id"], "test-pod.default");
    assert_eq!(p["types"]["Endpoints"]["acked_generation"], cp_dump["generation"]);
    assert_eq!(cp.metric("neutrino_cp_connected_proxies", "").await, 1.0);
}

#[tokio::test]
async fn a_mesh_file_edit_reaches_the_proxy_within_a_second() {
    let mesh = MeshFile::new(&mesh_yaml(3, &cpu_base));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let before = proxy.dump().await;

    let edited = Instant::now();
    mesh.write(&mesh_yaml(3, &|i| if i == 2 { 1500 } else { 1000 }));
    let received_before = stream_count(&before, "Endpoints", "resources_received");
    let dump = wait_for("the edit to reach the proxy", 5 * SECOND, || async {
        let d = proxy.dump().await;
        let cpu = &d["resources"]["Endpoints"]["default/svc-2"]["body"]["Endpoints"]["endpoints"][0]["capacity"]["cpu_millis"];
        ensure!(cpu == 1500, "still {cpu}");
        // The stream's counters are updated just after the snapshot is published: a dump
        // taken in between shows the edit but not yet its count.
        ensure!(stream_count(&d, "Endpoints", "resources_received") > received_before, "edit applied, not yet counted");
        Ok(d)
    })
    .await;
    let took = edited.elapsed();
    assert!(took < SECOND, "edit took {took:?} to reach the proxy");
    // Only what changed was pushed.
    assert_eq!(stream_count(&dump, "Endpoints", "resources_received"), received_before + 1);
    assert_eq!(stream_count(&dump, "Service", "responses"), stream_count(&before, "Service", "responses"));
    assert_eq!(version(&dump, "Endpoints", "default/svc-0"), version(&before, "Endpoints", "default/svc-0"));
}

#[tokio::test]
async fn an_invalid_mesh_file_is_reported_with_its_line_and_the_last_good_state_kept() {
    let mesh = MeshFile::new(&mesh_yaml(2, &cpu_base));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let before = proxy.dump().await;

    mesh.write(&mesh_yaml(2, &cpu_base).replace("address: 10.1.0.1", "address: 10.1.0.999"));
    let err = wait_for("the control plane to report the bad file", 5 * SECOND, || async {
        let d = get_json(cp.admin, "/config_dump").await?;
        d["source"]["last_error"].as_str().map(str::to_string).ok_or_else(|| anyhow!("no error yet"))
    })
    .await;
    let path = mesh.path().display().to_string();
    assert!(err.starts_with(&format!("{path}:11:19: services[1].endpoints[0].address: invalid IP address")), "{err}");
    assert!(err.contains("invalid IP address"), "{err}");
    assert_eq!(cp.metric("neutrino_cp_source_errors_total", "").await, 1.0);

    // Still ready, still serving the old state, to the proxy and to new proxies.
    let (code, _) = get(cp.admin, "/ready").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(proxy.dump().await["resources"], before["resources"]);
    let late = Proxy::start(cp.grpc);
    late.wait_ready().await;
    assert_eq!(late.dump().await["resources"], before["resources"]);

    // A truncated file (what an in-place rewrite looks like halfway) is not an empty mesh.
    std::fs::write(mesh.path(), "").unwrap();
    wait_for("the control plane to report the empty file", 5 * SECOND, || async {
        let d = get_json(cp.admin, "/config_dump").await?;
        let e = d["source"]["last_error"].as_str().unwrap_or_default().to_string();
        ensure!(e.contains("the file is empty"), "{e}");
        Ok(())
    })
    .await;
    assert_eq!(proxy.dump().await["resources"], before["resources"], "nothing removed");

    // Fixing the file clears the error.
    mesh.write(&mesh_yaml(2, &|_| 2000));
    wait_for("the fix to be published", 5 * SECOND, || async {
        let d = get_json(cp.admin, "/config_dump").await?;
        ensure!(d["source"]["last_error"].is_null(), "error still set");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn with_the_control_plane_killed_the_proxy_keeps_its_config_and_stays_ready() {
    let mesh = MeshFile::new(&mesh_yaml(2, &cpu_base));
    let mut cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let before = proxy.dump().await;

    cp.proc.kill();
    wait_for("the proxy to notice", 10 * SECOND, || async {
        let d = proxy.dump().await;
        ensure!(d["stream"]["state"] != "connected", "still connected");
        Ok(())
    })
    .await;
    // Let it fail to reconnect a few times, observably.
    wait_for("reconnect attempts to fail", 10 * SECOND, || async {
        let d = proxy.dump().await;
        let e = d["stream"]["last_error"].as_str().unwrap_or_default().to_string();
        ensure!(e.contains("connecting to the control plane"), "last error: {e}");
        Ok(())
    })
    .await;
    let after = proxy.dump().await;
    assert_eq!(proxy.ready_code().await, 200);
    assert_eq!(after["resources"], before["resources"]);
    assert_eq!(after["generation"], before["generation"]);
}

#[tokio::test]
async fn after_a_restart_the_proxy_resumes_and_only_changed_resources_are_sent() {
    let mesh = MeshFile::new(&mesh_yaml(4, &cpu_base));
    let mut cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let before = proxy.dump().await;

    // Same state after the restart: nothing is re-sent.
    cp.restart();
    let resumed = wait_for("the proxy to reconnect", 20 * SECOND, || async {
        let d = proxy.dump().await;
        ensure!(d["stream"]["connects"] == 2 && d["stream"]["state"] == "connected", "{}", d["stream"]);
        // Each type got its (empty) first response on the new stream.
        for k in ["Service", "Endpoints", "Capacity"] {
            ensure!(stream_count(&d, k, "responses") > stream_count(&before, k, "responses"), "{k} not synced");
        }
        Ok(d)
    })
    .await;
    for kind in ["Service", "Endpoints", "Capacity"] {
        let label = format!("kind=\"{kind}\"");
        assert_eq!(cp.metric("neutrino_cp_resources_sent_total", &label).await, 0.0, "{kind} re-sent");
        assert!(cp.metric("neutrino_cp_responses_sent_total", &label).await >= 1.0);
        assert_eq!(
            stream_count(&resumed, kind, "resources_received"),
            stream_count(&before, kind, "resources_received"),
            "{kind}"
        );
    }
    assert_eq!(resumed["resources"], before["resources"]);

    // Changed while the control plane was down: only that one resource is sent.
    cp.proc.kill();
    mesh.write(&mesh_yaml(4, &|i| if i == 3 { 3000 } else { 1000 }));
    cp.restart();
    wait_for("the proxy to resume again", 20 * SECOND, || async {
        let d = proxy.dump().await;
        ensure!(d["stream"]["connects"] == 3 && d["stream"]["state"] == "connected", "{}", d["stream"]);
        let cpu = &d["resources"]["Endpoints"]["default/svc-3"]["body"]["Endpoints"]["endpoints"][0]["capacity"]["cpu_millis"];
        ensure!(cpu == 3000, "cpu {cpu}");
        Ok(())
    })
    .await;
    assert_eq!(cp.metric("neutrino_cp_resources_sent_total", "kind=\"Endpoints\"").await, 1.0);
    assert_eq!(cp.metric("neutrino_cp_resources_sent_total", "kind=\"Service\"").await, 0.0);
}

#[tokio::test]
async fn a_hundred_rapid_edits_make_a_handful_of_pushes() {
    let mesh = MeshFile::new(&mesh_yaml(2, &cpu_base));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let before = proxy.dump().await;
    let published_before = cp.metric("neutrino_cp_snapshots_published_total", "").await;

    for n in 1..=100u32 {
        mesh.write(&mesh_yaml(2, &|_| 1000 + n));
        // Edits as fast as a script would make them, a few ms apart.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let after = wait_for("the last edit to arrive", 10 * SECOND, || async {
        let d = proxy.dump().await;
        let cpu = &d["resources"]["Endpoints"]["default/svc-0"]["body"]["Endpoints"]["endpoints"][0]["capacity"]["cpu_millis"];
        ensure!(cpu == 1100, "cpu {cpu}");
        Ok(d)
    })
    .await;
    let pushes = stream_count(&after, "Endpoints", "responses") - stream_count(&before, "Endpoints", "responses");
    let published = cp.metric("neutrino_cp_snapshots_published_total", "").await - published_before;
    assert!((1..=5).contains(&pushes), "{pushes} pushes for 100 edits");
    assert!((1.0..=5.0).contains(&published), "{published} snapshots for 100 edits");
}

#[tokio::test]
async fn streams_reach_their_maximum_age_and_the_proxy_resumes_without_resends() {
    let mesh = MeshFile::new(&mesh_yaml(2, &cpu_base));
    let cp = ControlPlane::start(&mesh.path(), &["--max-stream-age-secs", "1"]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let d = wait_for("two stream rotations", 20 * SECOND, || async {
        let d = proxy.dump().await;
        ensure!(d["stream"]["connects"].as_u64() >= Some(3), "{}", d["stream"]);
        Ok(d)
    })
    .await;
    assert_eq!(stream_count(&d, "Endpoints", "resources_received"), 2, "rotation re-sent resources");
    assert_eq!(cp.metric("neutrino_cp_resources_sent_total", "kind=\"Endpoints\"").await, 2.0);
    assert_eq!(proxy.ready_code().await, 200);
}

#[tokio::test]
async fn local_mode_feeds_the_same_path_from_a_file() {
    let mesh = MeshFile::new(&mesh_yaml(2, &cpu_base));
    let proxy = Proxy::start_local(&mesh.path());
    proxy.wait_ready().await;
    let d = proxy.dump().await;
    assert_eq!(d["stream"]["state"], "local");
    assert!(version(&d, "Endpoints", "default/svc-1").is_some());

    mesh.write(&mesh_yaml(1, &cpu_base));
    wait_for("svc-1 to be removed", 5 * SECOND, || async {
        let d = proxy.dump().await;
        ensure!(version(&d, "Service", "default/svc-1").is_none(), "still there");
        Ok(())
    })
    .await;

    mesh.write("services: [{name: Bad_Name, ports: [{port: 1}]}]\n");
    wait_for("the bad file to be reported", 5 * SECOND, || async {
        let d = proxy.dump().await;
        let e = d["stream"]["last_error"].as_str().unwrap_or_default().to_string();
        ensure!(e.contains("not a DNS label"), "{e}");
        ensure!(version(&d, "Service", "default/svc-0").is_some(), "lost the last good config");
        Ok(())
    })
    .await;
    assert_eq!(proxy.ready_code().await, 200);
}

/// How many read system calls a process has made (from /proc/<pid>/io).
fn read_syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("syscr: ")).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn an_idle_control_plane_does_not_keep_rereading_its_file() {
    // Regression: the watcher once re-read the mesh file on its own open events,
    // forever (dozens of reads a second). Idle, with no proxy connected, the control
    // plane has nothing to read.
    let mesh = MeshFile::new(&mesh_yaml(50, &cpu_base));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    cp.wait_ready().await;
    let pid = cp.proc.pid();
    let before = read_syscalls(pid);
    // Two seconds of doing nothing; what is measured is a count, not a time.
    tokio::time::sleep(2 * SECOND).await;
    let reads = read_syscalls(pid) - before;
    assert!(reads <= 10, "{reads} read system calls in 2 s while idle");
}
