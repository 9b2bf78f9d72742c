//! The SQLite file as an operator's file: one writer per resource across
//! processes (a `driftd reconcile` started while another process runs the
//! same resource's pass on the same file is skipped, `locked`), never
//! created behind the operator's back, and noticed when it vanishes.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftd::daemon::Daemon;
use driftd::store::{AnyStore, Ledger};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_respects_the_sqlite_resource_lock() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    db.insert_users(&[ghost(1)]).await;
    let (_up, addr) = upstream(users(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driftd.toml");
    std::fs::write(&config, ConfigBuilder::default().toml(&db, addr)).unwrap();
    let reconcile = || {
        Command::new(env!("CARGO_BIN_EXE_driftd"))
            .args(["reconcile", "users", "--config"])
            .arg(&config)
            .output()
            .expect("run driftd")
    };

    // Another driftd (here: this test) runs `users` on the same file.
    let holder = AnyStore::open(&db.url.clone().into(), 1).await.unwrap();
    let lock = holder
        .try_lock("users")
        .await
        .unwrap()
        .expect("free at first");
    assert!(
        holder.try_lock("users").await.unwrap().is_none(),
        "a second open of the lock file must see it held"
    );
    assert!(holder.try_lock("tenants").await.unwrap().is_some());
    let out = reconcile();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("locked"), "{err}");
    assert_eq!(db.count("users").await, 11, "nothing written while locked");

    lock.release().await;
    let out = reconcile();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(db.count("users").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_file_is_never_created() {
    let (_up, addr) = upstream(users(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("nothing-here.db");
    let config = dir.path().join("driftd.toml");
    let db = TestDb::new(Backend::Sqlite).await;
    let toml = ConfigBuilder::default()
        .toml(&db, addr)
        .replace(&db.url, &format!("sqlite://{}", db_path.display()));
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_driftd"))
        .args(["reconcile", "users", "--config"])
        .arg(&config)
        .output()
        .expect("run driftd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not exist; driftd never creates one"),
        "{err}"
    );
    assert!(!db_path.exists(), "the database file was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_database_file_is_noticed() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.create_users().await;
    db.insert_users(&users(10)).await;
    let (_up, addr) = upstream(users(10)).await;
    let schedules = tempfile::tempdir().unwrap();
    let cfg = ConfigBuilder {
        tail: open_worker_tail(schedules.path()),
        ..ConfigBuilder::default()
    };
    let settings = Arc::new(cfg.settings(&db, addr));
    let daemon = Daemon::start(settings).await.expect("daemon starts");
    let base = format!("http://{}", daemon.addr);
    let http = reqwest::Client::new();
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    let path = db.url.strip_prefix("sqlite://").unwrap().to_string();
    std::fs::remove_file(&path).unwrap();
    let started = Instant::now();
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(ready.status().as_u16(), 503);
    let body = ready.text().await.unwrap();
    assert!(body.contains("is gone"), "{body}");

    // A pass does not "succeed" into the unlinked file: the job cannot
    // even be recorded, and says why.
    let outcome = daemon
        .runner
        .run(
            driftd::runner::JobRequest {
                resource: "users".into(),
                trigger: driftd::jobs::Trigger::Http,
                mode: driftd::pass::Mode::Full,
                dry_run: false,
                force: false,
            },
            &(),
        )
        .await;
    match outcome {
        Ok((job, _)) => assert_eq!(job.status, driftd::jobs::JobStatus::Failed, "{job:?}"),
        Err(e) => assert!(e.to_string().contains("is gone"), "{e}"),
    }
    assert!(
        !std::path::Path::new(&path).exists(),
        "a new empty database was created"
    );
    daemon.stop().await;
}
