//! Interfaces facing client pods, found by name pattern: those present at
//! start and every link created later, as netlink reports them (RTNLGRP_LINK).
//! On a node, the CNI creates a host-side veth per pod at any time.

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
};
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A matching link exists (at start, created, renamed to a match, or changed).
    Present { name: String, index: u32 },
    /// A link went away, or was renamed so that no pattern matches it.
    Gone { name: String, index: u32 },
}

#[derive(Debug, Error)]
pub enum LinkWatchError {
    #[error("--interface-pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("listing links over netlink: {0}")]
    Dump(#[from] rtnetlink::Error),
}

/// Shell-style globs (`veth*`, `cali*`, `lxc*`, `eni*`).
#[derive(Clone, Debug, Default)]
pub struct Patterns(Vec<glob::Pattern>);

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Self, LinkWatchError> {
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map_err(|e| LinkWatchError::Pattern { pattern: p.clone(), message: e.msg.to_owned() })
            })
            .collect::<Result<_, _>>()
            .map(Patterns)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Sends a `Present` for every matching link, then follows changes until the
/// receiver goes away. Runs in the caller's network namespace.
pub async fn watch(patterns: Patterns, events: UnboundedSender<LinkEvent>) -> Result<(), LinkWatchError> {
    // Subscribe before listing: a link created in between shows up in one or
    // the other (or both, which is harmless), never in neither.
    let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(connection);
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await? {
        if let Some(name) = name_of(&link).filter(|n| patterns.matches(n)) {
            let _ = events.send(LinkEvent::Present { name, index: link.header.index });
        }
    }
    while let Some((message, _)) = messages.next().await {
        let event = match message.payload {
            // A link renamed away from the patterns is gone for us (nothing
            // is done about an index that was never ours).
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => name_of(&link).map(|name| {
                let index = link.header.index;
                if patterns.matches(&name) {
                    LinkEvent::Present { name, index }
                } else {
                    LinkEvent::Gone { name, index }
                }
            }),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                name_of(&link).map(|name| LinkEvent::Gone { name, index: link.header.index })
            }
            _ => None,
        };
        if let Some(event) = event
            && events.send(event).is_err()
        {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_cni_interface_names() {
        let p = Patterns::new(&["veth*".into(), "cali*".into(), "lxc[0-9a-f]*".into()]).unwrap();
        assert!(p.matches("veth1a2b3c") && p.matches("cali12345") && p.matches("lxc9f"));
        assert!(!p.matches("eth0") && !p.matches("lxc_health") && !p.matches("cilium_host"));
        let err = Patterns::new(&["veth[".into()]).unwrap_err().to_string();
        assert!(err.starts_with("--interface-pattern \"veth[\""), "{err}");
    }
}
