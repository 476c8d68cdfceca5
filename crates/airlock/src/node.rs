//! `airlock node`: run this host as a node of a cluster, or look at and
//! drain the cluster's nodes (docs/cluster.md).

use crate::{fresh_image, load_config, open_store, shutdown_on_signals, Common};
use airlock_drivers::ImageRef;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::time::Duration;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct NodeArgs {
    #[command(subcommand)]
    cmd: Option<NodeCommand>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// The registered nodes: lease, capacity, load, draining.
    Ls(Common),
    /// Stop placing sandboxes on a node and wait until its sandboxes are gone.
    Drain {
        name: String,
        /// Return at once instead of waiting.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a node that is gone for good: its sandboxes' addresses are
    /// released (its host must not run them any more) and it leaves the list.
    Forget {
        name: String,
        /// Confirm that the host is gone (or its sandboxes are destroyed).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Place sandboxes on a drained node again.
    Resume {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

pub(crate) async fn run(args: NodeArgs) -> Result<()> {
    match args.cmd {
        None => serve(args.common).await,
        Some(NodeCommand::Ls(common)) => ls(&common).await,
        Some(NodeCommand::Drain {
            name,
            no_wait,
            common,
        }) => drain(&common, &name, !no_wait).await,
        Some(NodeCommand::Forget { name, yes, common }) => forget(&common, &name, yes).await,
        Some(NodeCommand::Resume { name, common }) => {
            let (_, store) = open_store(&common).await?;
            if !store.set_node_draining(&name, false).await? {
                bail!("no node named {name:?} is registered");
            }
            println!("node {name} takes new sandboxes again");
            Ok(())
        }
    }
}

async fn serve(common: Common) -> Result<()> {
    let cfg = load_config(&common)?;
    cfg.validate_node()?;
    let manifest = tokio::task::block_in_place(|| fresh_image(&cfg))?;
    let driver = airlock_server::server::driver_for(&cfg, &manifest)?;
    let backend = driver.name();
    let running =
        airlock_server::cluster::node::start(&cfg, ImageRef::of(&manifest), driver).await?;
    shutdown_on_signals(running.shutdown_handle());
    println!(
        "airlock node {} is up: node API on {} (image {}, driver {backend})",
        running.name, running.addr, manifest.build_id
    );
    running.wait().await?;
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

async fn ls(common: &Common) -> Result<()> {
    let (_, store) = open_store(common).await?;
    let now = airlock_server::store::now_ms();
    let load: std::collections::HashMap<String, u32> =
        store.load_by_node().await?.into_iter().collect();
    println!(
        "{:<16} {:<22} {:<9} {:>9} {:>5} {:>13} {:>9} {:>9}  IMAGE",
        "NAME", "ADDRESS", "STATE", "LEASE", "CPUS", "MEM FREE/GiB", "DISK/GiB", "SANDBOXES"
    );
    for n in store.nodes().await? {
        let state = match (n.alive(now), n.draining) {
            (false, _) => "lost",
            (true, true) => "draining",
            (true, false) => "up",
        };
        let lease = format!("{:+.1}s", (n.lease_expires_at - now) as f64 / 1000.0);
        println!(
            "{:<16} {:<22} {:<9} {:>9} {:>5} {:>13} {:>9} {:>9}  {}",
            n.name,
            n.address,
            state,
            lease,
            n.cpus,
            format!("{}/{}", gib(n.memory_free), gib(n.memory_total)),
            gib(n.disk_free),
            load.get(&n.name).copied().unwrap_or(0),
            n.image_build_id
        );
    }
    Ok(())
}

async fn drain(common: &Common, name: &str, wait: bool) -> Result<()> {
    let (_, store) = open_store(common).await?;
    if !store.set_node_draining(name, true).await? {
        bail!("no node named {name:?} is registered");
    }
    eprintln!("node {name} takes no new sandboxes");
    if !wait {
        return Ok(());
    }
    loop {
        let left = store.wanted_on(name).await?.len();
        if left == 0 {
            println!("node {name} is drained: no sandbox runs on it");
            return Ok(());
        }
        eprintln!("waiting for {left} sandbox(es) on {name} to end…");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

async fn forget(common: &Common, name: &str, yes: bool) -> Result<()> {
    use airlock_server::app::state::{advance, Event, SandboxState};
    let (_, store) = open_store(common).await?;
    let Some(node) = store.node(name).await? else {
        bail!("no node named {name:?} is registered");
    };
    let now = airlock_server::store::now_ms();
    if node.alive(now) {
        bail!("node {name} is up (its lease runs until it stops renewing); stop it first");
    }
    let wanted = store.wanted_on(name).await?;
    if !wanted.is_empty() {
        bail!(
            "{} sandbox(es) on {name} are not yet failed (the leader fails them within seconds of the lease's end); try again shortly",
            wanted.len()
        );
    }
    let leased = store.leased_on(name).await?;
    if !yes {
        bail!(
            "this releases the addresses of {} sandbox(es) of {name}: if its host still runs them, \
             two sandboxes could share an address. Pass --yes once the host is gone",
            leased.len()
        );
    }
    for id in &leased {
        store.release_lease(id).await?;
        if let Some(row) = store.sandbox(id).await? {
            if row.state == SandboxState::Stopping {
                let _ = advance(&store, id, &Event::Released).await;
            }
        }
    }
    store.delete_node(name).await?;
    println!(
        "node {name} is forgotten; the addresses of {} sandbox(es) are free again",
        leased.len()
    );
    Ok(())
}
