//! Placement: which node a new sandbox goes to. A pure function of the
//! registry and the load the store counts, so it is tested without any node.

use crate::store::NodeRow;
use std::collections::HashMap;

/// What a new sandbox needs of its node.
#[derive(Debug, Clone)]
pub struct Need {
    pub image_build_id: String,
    /// Memory the sandbox holds from its start (the admission's reservation).
    pub memory: u64,
    /// Memory and disk that must stay free on the node.
    pub min_free_memory: u64,
    pub min_free_disk: u64,
}

/// Why no node was chosen, worded for the sandbox's failure reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no node is up (none has renewed its lease)")]
    NoNode,
    #[error("every node that is up is draining")]
    AllDraining,
    #[error("no node that is up has image {0}")]
    NoImage(String),
    #[error("no node has room: {0}")]
    NoRoom(String),
}

/// A node's memory still free once the sandboxes placed on it but not yet
/// counted in its last report are taken off.
fn headroom(n: &NodeRow, placed: u32, need: &Need) -> u64 {
    let unreported = u64::from(placed.saturating_sub(n.running));
    n.memory_free
        .saturating_sub(unreported.saturating_mul(need.memory))
        .saturating_sub(need.min_free_memory)
}

/// Among the nodes that are up, not draining, hold the image and have room
/// for one more sandbox, the one with the fewest sandboxes (spreading, so a
/// node's loss takes as few as it can); ties go to the one with more memory
/// to spare, then by name. Memory is the gate, not the rank: nodes reading
/// one host's free memory a moment apart (or hosts of one size) differ by
/// noise, and would otherwise fill unevenly.
pub fn place(
    nodes: &[NodeRow],
    load: &HashMap<String, u32>,
    need: &Need,
    now: i64,
) -> Result<String, Refusal> {
    let up: Vec<&NodeRow> = nodes.iter().filter(|n| n.alive(now)).collect();
    if up.is_empty() {
        return Err(Refusal::NoNode);
    }
    let open: Vec<&NodeRow> = up.into_iter().filter(|n| !n.draining).collect();
    if open.is_empty() {
        return Err(Refusal::AllDraining);
    }
    let with_image: Vec<&NodeRow> = open
        .into_iter()
        .filter(|n| n.image_build_id == need.image_build_id)
        .collect();
    if with_image.is_empty() {
        return Err(Refusal::NoImage(need.image_build_id.clone()));
    }
    let placed = |n: &NodeRow| load.get(&n.name).copied().unwrap_or(0);
    let mut why = Vec::new();
    let best = with_image
        .into_iter()
        .filter(|n| {
            let room = headroom(n, placed(n), need) >= need.memory;
            let disk = n.disk_free >= need.min_free_disk;
            if !room {
                why.push(format!("{} lacks memory", n.name));
            } else if !disk {
                why.push(format!("{} lacks disk", n.name));
            }
            room && disk
        })
        .max_by(|a, b| {
            let (ha, hb) = (headroom(a, placed(a), need), headroom(b, placed(b), need));
            placed(b)
                .cmp(&placed(a))
                .then(ha.cmp(&hb))
                .then(b.name.cmp(&a.name))
        });
    best.map(|n| n.name.clone())
        .ok_or_else(|| Refusal::NoRoom(why.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, free_gib: u64) -> NodeRow {
        NodeRow {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            backend: "fake".into(),
            image_build_id: "img".into(),
            cpus: 2,
            memory_total: 64 * GIB,
            memory_free: free_gib * GIB,
            disk_free: 100 * GIB,
            running: 0,
            started_at: 0,
            heartbeat_at: 0,
            lease_expires_at: 10_000,
            draining: false,
        }
    }

    fn need() -> Need {
        Need {
            image_build_id: "img".into(),
            memory: 512 << 20,
            min_free_memory: 768 << 20,
            min_free_disk: 2 * GIB,
        }
    }

    #[test]
    fn the_emptiest_node_wins_then_the_roomiest_and_equal_nodes_fill_in_turn() {
        let nodes = vec![node("a", 8), node("b", 16), node("c", 8)];
        let none = HashMap::new();
        assert_eq!(place(&nodes, &none, &need(), 5_000).expect("ok"), "b");
        // Equal nodes: one sandbox at a time on each, in turn.
        let equal = vec![node("a", 8), node("b", 8), node("c", 8)];
        let mut load = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            let n = place(&equal, &load, &need(), 5_000).expect("ok");
            *load.entry(n.clone()).or_insert(0) += 1;
            order.push(n);
        }
        assert_eq!(order, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn sandboxes_placed_but_not_yet_reported_count_against_a_node() {
        // b reports more memory, but 10 sandboxes were placed on it since.
        let nodes = vec![node("a", 8), node("b", 10)];
        let load = HashMap::from([("b".to_owned(), 10)]);
        assert_eq!(place(&nodes, &load, &need(), 5_000).expect("ok"), "a");
    }

    #[test]
    fn lost_draining_imageless_and_full_nodes_are_never_chosen() {
        let mut lost = node("lost", 32);
        lost.lease_expires_at = 4_000;
        let mut draining = node("draining", 32);
        draining.draining = true;
        let mut other = node("other-image", 32);
        other.image_build_id = "old".into();
        let full = node("full", 1);
        let none = HashMap::new();
        assert_eq!(
            place(&[lost.clone()], &none, &need(), 5_000),
            Err(Refusal::NoNode)
        );
        assert_eq!(
            place(&[lost.clone(), draining.clone()], &none, &need(), 5_000),
            Err(Refusal::AllDraining)
        );
        assert_eq!(
            place(&[other.clone()], &none, &need(), 5_000),
            Err(Refusal::NoImage("img".into()))
        );
        let Err(Refusal::NoRoom(why)) = place(std::slice::from_ref(&full), &none, &need(), 5_000)
        else {
            panic!("a full node was chosen");
        };
        assert!(why.contains("full lacks memory"), "{why}");
        let ok = node("ok", 4);
        assert_eq!(
            place(&[lost, draining, other, full, ok], &none, &need(), 5_000).expect("ok"),
            "ok"
        );
    }
}
