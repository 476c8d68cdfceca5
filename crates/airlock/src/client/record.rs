//! `airlock sandbox record ID start|stop|ls|get`: server-side screen
//! recordings (docs/recording.md).

use super::api::{seg, Api};
use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;
use std::io::Write;

#[derive(Debug, Subcommand)]
pub enum RecordCommand {
    /// Start recording the sandbox's screen; prints the recording's id.
    Start,
    /// Stop the recording under way; prints its duration and size.
    Stop,
    /// List the sandbox's recordings.
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a recording (MP4).
    Get {
        rid: String,
        /// Where to write it; `-` is stdout.
        #[arg(short, long)]
        output: String,
    },
}

fn line(r: &Value) -> String {
    format!(
        "{:<18} {:<25} {:>8.1}s {:>10} {}x{} {}",
        r["id"].as_str().unwrap_or(""),
        r["started_at"].as_str().unwrap_or(""),
        r["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
        r["bytes"].as_u64().unwrap_or(0),
        r["width"].as_u64().unwrap_or(0),
        r["height"].as_u64().unwrap_or(0),
        if r["active"].as_bool() == Some(true) {
            "recording".to_owned()
        } else {
            r["ended"].as_str().unwrap_or("").to_owned()
        },
    )
}

pub async fn run(api: &Api, id: &str, cmd: RecordCommand) -> anyhow::Result<i32> {
    let base = format!("/api/v1/sandboxes/{}/recordings", seg(id));
    match cmd {
        RecordCommand::Start => {
            let r = api.json(Method::POST, &base, None).await?;
            println!("{}", r["id"].as_str().unwrap_or(""));
        }
        RecordCommand::Stop => {
            let r = api
                .json(Method::DELETE, &format!("{base}/current"), None)
                .await?;
            println!("{}", line(&r));
        }
        RecordCommand::Ls { json } => {
            let body = api.get(&base).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                for r in body["recordings"].as_array().into_iter().flatten() {
                    println!("{}", line(r));
                }
            }
        }
        RecordCommand::Get { rid, output } => {
            let mut resp = api
                .send(api.request(Method::GET, &format!("{base}/{}", seg(&rid))))
                .await?;
            let mut out: Box<dyn Write> = if output == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(
                    std::fs::File::create(&output).with_context(|| format!("creating {output}"))?,
                )
            };
            let mut n = 0usize;
            while let Some(chunk) = resp.chunk().await.context("downloading the recording")? {
                out.write_all(&chunk)?;
                n += chunk.len();
            }
            out.flush()?;
            if output != "-" {
                eprintln!("{n} bytes written to {output}");
            }
        }
    }
    Ok(0)
}
