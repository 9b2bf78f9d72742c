//! `driftd reconcile --remote URL`: trigger a pass through a running
//! driftd's admin API and wait for its job to end.

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value as Json;

use crate::report;

/// Triggers `resource`, follows the job, prints the report; returns the
/// exit code `driftd reconcile` would have.
pub async fn reconcile(base: &str, resource: &str, body: Json, json: bool) -> anyhow::Result<i32> {
    let base = base.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()?;
    let token = std::env::var("DRIFTD_ADMIN__TOKEN").ok();
    let mut post = http
        .post(format!("{base}/v1/resources/{resource}/reconcile"))
        .header(CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(t) = &token {
        post = post.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let accepted = read_json(
        post.send()
            .await
            .with_context(|| format!("POST to {base}"))?,
    )
    .await?;
    let id = accepted["job_id"]
        .as_str()
        .context("the reply has no job_id")?
        .to_string();
    let coalesced = accepted["coalesced"] == Json::Bool(true);
    if coalesced {
        eprintln!("a pass of {resource} was already running: following job {id}");
    }
    let job = loop {
        let job = read_json(
            http.get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await
                .with_context(|| format!("GET job {id}"))?,
        )
        .await?;
        match job["status"].as_str() {
            Some("queued" | "running") => tokio::time::sleep(Duration::from_millis(300)).await,
            Some(_) => break job,
            None => bail!("job {id} has no status"),
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        match serde_json::from_value::<crate::pass::PassReport>(job["report"].clone()) {
            Ok(r) => print!("{}", report::human(&r)),
            Err(_) => println!(
                "job {id} {}: {}",
                job["status"].as_str().unwrap_or("?"),
                job["reason"].as_str().unwrap_or("")
            ),
        }
    }
    // Following another pass: its end only stands for ours if it was the
    // same kind of pass (a dry run changes nothing, a restricted mode less).
    let asked_dry = body["dry_run"] == Json::Bool(true);
    let asked_mode = body["mode"].as_str().unwrap_or("full");
    if coalesced && (job["dry_run"] != Json::Bool(asked_dry) || job["mode"] != asked_mode) {
        eprintln!(
            "error: the pass asked for did not run: job {id} (mode {}, dry run {}) was running and was followed instead; try again when it ends",
            job["mode"].as_str().unwrap_or("?"),
            job["dry_run"]
        );
        return Ok(report::exit::ERROR);
    }
    Ok(match job["status"].as_str() {
        // A dry run exits 0 whether or not it found drift, as locally.
        Some("drift_found") if job["dry_run"] == false => report::exit::DRIFT_LEFT,
        Some("succeeded" | "drift_found") => report::exit::OK,
        Some("guard_tripped") => report::exit::GUARD_TRIPPED,
        _ => report::exit::ERROR,
    })
}

async fn read_json(resp: reqwest::Response) -> anyhow::Result<Json> {
    let status = resp.status();
    let body = resp.bytes().await?;
    let json: Json = serde_json::from_slice(&body).with_context(|| {
        format!(
            "HTTP {status}: not JSON: {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            json["error"]["message"].as_str().unwrap_or("error")
        );
    }
    Ok(json)
}
