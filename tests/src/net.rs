//! The cluster's network: one bridge in the root namespace, one veth pair per node.
//!
//! Cluster slot `k` owns bridge `ferrybr<k>` (address 10.99.k.254/24, alias
//! `ferry:<DIR>` so a crashed cluster's bridge is found again), and node `i` is
//! 10.99.k.i on `eth0` inside its namespace, the host end being `fv<k>-<i>`.
//! Slots are claimed by creating the bridge: the kernel refuses a second one of the
//! same name, so clusters started side by side never share a slot.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Largest slot number (`10.99.<slot>.0/24`).
pub const MAX_SLOT: u8 = 250;
/// Bridge-alias prefix that marks a Ferry bridge.
pub const ALIAS_PREFIX: &str = "ferry:";

/// Why the network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`ip {args}` failed: {stderr} (is iproute2 installed? run scripts/setup.sh)")]
    Ip { args: String, stderr: String },
    #[error("no free cluster slot: bridges ferrybr0..ferrybr{MAX_SLOT} all exist; clean stale ones with `cluster down --stale`")]
    NoSlot,
}

/// Bridge name of slot `k`.
pub fn bridge_name(k: u8) -> String {
    format!("ferrybr{k}")
}

/// Host-side veth name of node `i` in slot `k`.
pub fn veth_name(k: u8, i: usize) -> String {
    format!("fv{k}-{i}")
}

/// Address of node `i` (1-based) in slot `k`.
pub fn node_addr(k: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, k, i as u8)
}

/// The bridge's own address in slot `k`.
pub fn bridge_addr(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, k, 254)
}

/// Runs `ip` with `args`, optionally inside the network namespace of `netns_pid`.
pub fn ip(netns_pid: Option<i32>, args: &[&str]) -> Result<(), NetError> {
    let mut cmd = match netns_pid {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{pid}/ns/net")).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Ip {
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Claims the first free slot by creating its bridge, tagged with `dir`, addressed and up.
pub fn create_bridge(dir: &Path) -> Result<u8, NetError> {
    for k in 0..=MAX_SLOT {
        let name = bridge_name(k);
        if Path::new("/sys/class/net").join(&name).exists() {
            continue;
        }
        if ip(None, &["link", "add", &name, "type", "bridge"]).is_err() {
            continue; // lost a race for this slot, or it appeared meanwhile
        }
        let alias = format!("{ALIAS_PREFIX}{}", dir.display());
        let addr = format!("{}/24", bridge_addr(k));
        let setup = ip(None, &["link", "set", "dev", &name, "alias", &alias])
            .and_then(|()| ip(None, &["addr", "add", &addr, "dev", &name]))
            .and_then(|()| ip(None, &["link", "set", "dev", &name, "up"]));
        if let Err(e) = setup {
            let _ = ip(None, &["link", "del", &name]);
            return Err(e);
        }
        return Ok(k);
    }
    Err(NetError::NoSlot)
}

/// Connects the node whose namespaces are held by `holder` to bridge slot `k` as node `i`.
pub fn connect_node(k: u8, i: usize, holder: i32) -> Result<String, NetError> {
    let veth = veth_name(k, i);
    let pid = holder.to_string();
    ip(
        None,
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pid,
        ],
    )?;
    ip(
        None,
        &["link", "set", "dev", &veth, "master", &bridge_name(k), "up"],
    )?;
    let addr = format!("{}/24", node_addr(k, i));
    ip(Some(holder), &["addr", "add", &addr, "dev", "eth0"])?;
    ip(Some(holder), &["link", "set", "dev", "eth0", "up"])?;
    ip(Some(holder), &["link", "set", "dev", "lo", "up"])?;
    Ok(veth)
}

/// Deletes a link if it exists.
pub fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = ip(None, &["link", "del", name]);
    }
}

/// Ferry bridges present now, with the cluster directory from their alias.
pub fn ferry_bridges() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("ferrybr") {
            continue;
        }
        let alias = std::fs::read_to_string(e.path().join("ifalias")).unwrap_or_default();
        let dir = alias
            .trim()
            .strip_prefix(ALIAS_PREFIX)
            .unwrap_or("")
            .to_owned();
        found.push((name, dir));
    }
    found
}

/// Host-side veths of slot `k` still present.
pub fn veths_of_slot(k: u8) -> Vec<String> {
    let prefix = format!("fv{k}-");
    std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}
