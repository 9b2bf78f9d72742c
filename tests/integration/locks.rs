//! One writer per resource on SQLite too: a `driftd reconcile` started
//! while another process runs the same resource's pass on the same file is
//! skipped (`locked`), never run alongside.

use std::process::Command;

use driftd::store::{AnyStore, Store};

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
