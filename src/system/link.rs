//! Links, addresses and routes over rtnetlink.
//!
//! A [`Netlink`] handle is bound to the network namespace its socket was opened in, so one
//! handle in the host namespace and one inside the confined namespace are enough for `up`.
//! The API is synchronous; each handle drives its own single-threaded runtime, which keeps
//! everything on the calling thread (namespace switches are per thread).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};

use crate::config::Cidr;
use crate::system::netns;

/// How many requests are in flight at once when adding many routes or addresses.
const PIPELINE: usize = 64;

/// How long one netlink request (or one pipelined batch) may take. The kernel answers in
/// microseconds; a request it never answers must not hold `up`, `down` or `status` forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum RouteOp {
    Add,
    Delete,
}

pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// `IFLA_INFO_KIND`: "wireguard", "tun", "dummy", ...; None for links without one (lo).
    pub kind: Option<String>,
    /// `IFLA_MTU`; None when the kernel did not say.
    pub mtu: Option<u32>,
}

impl Link {
    fn from_message(message: &rtnetlink::packet_route::link::LinkMessage) -> Link {
        let name = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        let kind = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        });
        let mtu = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        });
        Link {
            index: message.header.index,
            name: name.unwrap_or_default(),
            up: message.header.flags.contains(LinkFlags::Up),
            kind,
            mtu,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    pub interface: u32,
    /// Made by the kernel for an address's prefix, not by us.
    pub kernel: bool,
}

/// The kernel's error as an `io::Error`, so callers can look at the errno.
pub fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

impl Netlink {
    /// A handle for the namespace the calling thread is in.
    pub fn here() -> Result<Netlink> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("starting the netlink runtime")?;
        let (connection, handle, _) = {
            let _guard = runtime.enter();
            rtnetlink::new_connection().context("opening a netlink socket")?
        };
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    /// A handle for the namespace `fd`: the socket is opened there, then the thread returns.
    pub fn inside(fd: impl AsFd) -> Result<Netlink> {
        netns::within(fd, Netlink::here)?
    }

    /// Runs one request (or batch) on this handle's runtime, giving up after
    /// [`REQUEST_TIMEOUT`].
    fn block<T, E: From<io::Error>>(
        &self,
        request: impl std::future::Future<Output = std::result::Result<T, E>>,
    ) -> std::result::Result<T, E> {
        self.block_within(REQUEST_TIMEOUT, request)
    }

    fn block_within<T, E: From<io::Error>>(
        &self,
        limit: Duration,
        request: impl std::future::Future<Output = std::result::Result<T, E>>,
    ) -> std::result::Result<T, E> {
        self.runtime
            .block_on(async { tokio::time::timeout(limit, request).await })
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the kernel did not answer a netlink request within {}s",
                        limit.as_secs_f32()
                    ),
                )
                .into())
            })
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        self.block(async {
            let mut stream = self.handle.link().get().execute();
            let mut links = Vec::new();
            while let Some(message) = stream.try_next().await.map_err(to_io)? {
                links.push(Link::from_message(&message));
            }
            Ok::<_, io::Error>(links)
        })
        .context("listing links")
    }

    pub fn index_of(&self, name: &str) -> Result<Option<u32>> {
        Ok(self
            .links()?
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.index))
    }

    /// Creates a kernel WireGuard link here. The raw error is kept: `EOPNOTSUPP` means the
    /// kernel has no WireGuard.
    pub fn add_wireguard(&self, name: &str) -> io::Result<u32> {
        self.add_link(LinkWireguard::new(name).build())?;
        self.index_of(name)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other(format!("link {name} vanished right after creation")))
    }

    /// Creates a kernel WireGuard link that is born in the namespace `target` (one
    /// RTM_NEWLINK carrying IFLA_NET_NS_FD). WireGuard binds its UDP socket in the namespace of
    /// the process that creates the link, so the socket stays where this handle lives while the
    /// link never exists outside `target`: no move, and none of the RCU grace periods a move
    /// costs. Errors as for [`Netlink::add_wireguard`].
    pub fn add_wireguard_in(&self, name: &str, target: impl AsFd) -> io::Result<()> {
        self.add_link(
            LinkWireguard::new(name)
                .setns_by_fd(target.as_fd().as_raw_fd())
                .build(),
        )
    }

    fn add_link(&self, message: rtnetlink::packet_route::link::LinkMessage) -> io::Result<()> {
        self.block(async {
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(to_io)
        })
    }

    pub fn delete(&self, index: u32) -> Result<()> {
        self.block(async { self.handle.link().del(index).execute().await.map_err(to_io) })
            .with_context(|| format!("deleting link {index}"))
    }

    /// Moves a link into the namespace `fd`. Its index may change there; look it up again.
    pub fn move_to(&self, index: u32, fd: impl AsFd) -> Result<()> {
        self.set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(fd.as_fd().as_raw_fd())
                .build(),
        )
        .context("moving the link into the namespace")
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).up().build())
            .with_context(|| format!("bringing link {index} up"))
    }

    pub fn set_down(&self, index: u32) -> Result<()> {
        self.set(LinkUnspec::new_with_index(index).down().build())
            .with_context(|| format!("taking link {index} down"))
    }

    fn set(&self, message: rtnetlink::packet_route::link::LinkMessage) -> io::Result<()> {
        self.block(async {
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(to_io)
        })
    }

    pub fn set_mtu(&self, index: u32, mtu: u16) -> Result<()> {
        self.set(
            LinkUnspec::new_with_index(index)
                .mtu(u32::from(mtu))
                .build(),
        )
        .with_context(|| format!("setting the MTU of link {index} to {mtu}"))
    }

    pub fn add_addresses(&self, index: u32, addresses: &[Cidr]) -> Result<()> {
        for chunk in addresses.chunks(PIPELINE) {
            let requests = chunk.iter().map(|a| {
                let mut request = self.handle.address().add(index, a.addr, a.prefix);
                // A tunnel has no link layer to find a duplicate on: without this an IPv6
                // address stays tentative (unusable as a source, refused to bind) until the
                // kernel's DAD work has run, which a busy machine delays.
                if a.addr.is_ipv6() {
                    request
                        .message_mut()
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                async move {
                    request
                        .execute()
                        .await
                        .map_err(to_io)
                        .with_context(|| format!("adding address {a}"))
                }
            });
            self.block(futures::future::try_join_all(requests))?;
        }
        Ok(())
    }

    /// Adds a device route for each prefix (host bits cleared), pipelined: a thousand routes
    /// cost a few round trips, not a thousand. Two peers may share a prefix; one route serves
    /// them.
    pub fn add_routes(&self, index: u32, prefixes: &[Cidr]) -> Result<()> {
        self.route_requests(index, prefixes, RouteOp::Add)
    }

    /// Deletes the device routes `add_routes` made for `prefixes`. A route already gone is
    /// not an error.
    pub fn delete_routes(&self, index: u32, prefixes: &[Cidr]) -> Result<()> {
        self.route_requests(index, prefixes, RouteOp::Delete)
    }

    fn route_requests(&self, index: u32, prefixes: &[Cidr], op: RouteOp) -> Result<()> {
        for chunk in prefixes.chunks(PIPELINE) {
            let requests = chunk.iter().map(|prefix| {
                let net = prefix.network();
                let message = RouteMessageBuilder::<IpAddr>::new()
                    .destination_prefix(net.addr, net.prefix)
                    .map(|b| b.output_interface(index).scope(RouteScope::Link).build());
                let handle = self.handle.clone();
                async move {
                    let message = message.with_context(|| format!("route to {net}"))?;
                    let done = match op {
                        RouteOp::Add => handle.route().add(message).execute().await,
                        RouteOp::Delete => handle.route().del(message).execute().await,
                    };
                    match (op, done.map_err(to_io)) {
                        (_, Ok(())) => Ok(()),
                        (RouteOp::Add, Err(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
                            Ok(())
                        }
                        (RouteOp::Delete, Err(e)) if e.raw_os_error() == Some(libc::ESRCH) => {
                            Ok(())
                        }
                        (RouteOp::Add, Err(e)) => {
                            Err(e).with_context(|| format!("adding route to {net}"))
                        }
                        (RouteOp::Delete, Err(e)) => {
                            Err(e).with_context(|| format!("deleting route to {net}"))
                        }
                    }
                }
            });
            self.block(futures::future::try_join_all(requests))?;
        }
        Ok(())
    }

    /// Deletes `addresses` from link `index`; an address not there is not an error.
    pub fn delete_addresses(&self, index: u32, addresses: &[Cidr]) -> Result<()> {
        if addresses.is_empty() {
            return Ok(());
        }
        self.block(async {
            for (cidr, message) in self.address_messages(index).await? {
                if !addresses.contains(&cidr) {
                    continue;
                }
                if let Err(e) = self.handle.address().del(message).execute().await {
                    let e = to_io(e);
                    if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) {
                        return Err(e);
                    }
                }
            }
            Ok::<_, io::Error>(())
        })
        .context("deleting addresses")
    }

    /// An `unreachable` route: packets for `prefix` fail at once instead of following the
    /// default route off the machine.
    pub fn add_unreachable(&self, prefix: Cidr) -> Result<()> {
        let message = unreachable_route(prefix)?;
        self.block(async {
            self.handle
                .route()
                .add(message)
                .execute()
                .await
                .map_err(to_io)
        })
        .with_context(|| format!("adding unreachable route {prefix}"))
    }

    pub fn delete_unreachable(&self, prefix: Cidr) -> Result<()> {
        let message = unreachable_route(prefix)?;
        match self.block(async {
            self.handle
                .route()
                .del(message)
                .execute()
                .await
                .map_err(to_io)
        }) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                Err(e).with_context(|| format!("deleting unreachable route {prefix}"))
            }
            _ => Ok(()),
        }
    }

    pub fn addresses(&self, index: u32) -> Result<Vec<Cidr>> {
        self.block(async {
            let messages = self.address_messages(index).await?;
            Ok::<_, io::Error>(messages.into_iter().map(|(cidr, _)| cidr).collect())
        })
        .context("listing addresses")
    }

    /// The addresses of link `index`, each with the message that deletes it. The local
    /// address is ours; IFA_ADDRESS is the peer's on a point-to-point link that has one.
    async fn address_messages(&self, index: u32) -> io::Result<Vec<(Cidr, AddressMessage)>> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = Vec::new();
        while let Some(message) = stream.try_next().await.map_err(to_io)? {
            if let Some(cidr) = address_of(&message) {
                found.push((cidr, message));
            }
        }
        Ok(found)
    }

    /// Every route of the namespace, both families, as rtnetlink lists them.
    fn route_messages(&self) -> Result<Vec<rtnetlink::packet_route::route::RouteMessage>> {
        let mut messages = Vec::new();
        for query in route_queries() {
            messages.extend(
                self.block(
                    self.handle
                        .route()
                        .get(query)
                        .execute()
                        .map(|r| r.map_err(to_io))
                        .try_collect::<Vec<_>>(),
                )
                .context("listing routes")?,
            );
        }
        Ok(messages)
    }

    /// Unicast routes of the main table, both families.
    pub fn routes(&self) -> Result<Vec<Route>> {
        Ok(self
            .route_messages()?
            .iter()
            .filter_map(main_unicast_route)
            .collect())
    }
}

/// The address an RTM_NEWADDR message carries. The local address is ours; IFA_ADDRESS is the
/// peer's on a point-to-point link that has one.
fn address_of(message: &AddressMessage) -> Option<Cidr> {
    let attribute = |want_local: bool| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if want_local => Some(*ip),
            AddressAttribute::Address(ip) if !want_local => Some(*ip),
            _ => None,
        })
    };
    let addr = attribute(true).or_else(|| attribute(false))?;
    Some(Cidr {
        addr,
        prefix: message.header.prefix_len,
    })
}

/// The two route listings, one per family.
fn route_queries() -> [rtnetlink::packet_route::route::RouteMessage; 2] {
    [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ]
}

/// The route an RTM_NEWROUTE message carries, when it is a unicast route of the main table.
fn main_unicast_route(message: &rtnetlink::packet_route::route::RouteMessage) -> Option<Route> {
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(message.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || message.header.kind != RouteType::Unicast {
        return None;
    }
    let mut destination = None;
    let mut interface = 0;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                destination = Some(IpAddr::V4(*a))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                destination = Some(IpAddr::V6(*a))
            }
            RouteAttribute::Oif(i) => interface = *i,
            _ => {}
        }
    }
    let family_v6 = message.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
    let addr = destination.unwrap_or(if family_v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    Some(Route {
        destination: Cidr {
            addr,
            prefix: message.header.destination_prefix_length,
        },
        interface,
        kernel: message.header.protocol == RouteProtocol::Kernel,
    })
}

/// Listings over a plain blocking rtnetlink socket, without [`Netlink`]'s runtime: for a
/// reader that asks for a link, its addresses and the routes, and goes (`status`, once per
/// scrape), where starting and stopping a runtime costs more than the asking. The messages
/// are the same the `rtnetlink` requests send, made and read with its own packet types.
pub struct Listing {
    socket: rtnetlink::sys::Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Listing {
    /// A socket of the namespace `fd` (a netlink socket belongs to the namespace it is made in).
    pub fn inside(fd: impl AsFd) -> Result<Listing> {
        let socket = netns::within(fd, || {
            rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
        })?
        .context("opening a netlink socket")?;
        let timeout = nix::sys::time::TimeVal::new(REQUEST_TIMEOUT.as_secs() as _, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .context("setting the netlink socket's timeout")?;
        Ok(Listing {
            socket,
            sequence: 0,
            buffer: Vec::new(),
        })
    }

    /// The link called `name`, asked for by name (one answer, not a listing); `None` when there
    /// is none. The kernel also finds a link by an alternative name: only one whose name is
    /// `name` counts.
    pub fn link_named(&mut self, name: &str) -> Result<Option<Link>> {
        let mut message = rtnetlink::packet_route::link::LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        match self.ask(RouteNetlinkMessage::GetLink(message), false) {
            Ok(answers) => Ok(answers
                .iter()
                .find_map(|a| match a {
                    RouteNetlinkMessage::NewLink(link) => Some(Link::from_message(link)),
                    _ => None,
                })
                .filter(|l| l.name == name)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name:?}")),
        }
    }

    /// The addresses of link `index` (see [`Netlink::addresses`]).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<Cidr>> {
        let message = RouteNetlinkMessage::GetAddress(AddressMessage::default());
        Ok(self
            .ask(message, true)
            .context("listing addresses")?
            .iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => address_of(a),
                _ => None,
            })
            .collect())
    }

    /// Unicast routes of the main table, both families (see [`Netlink::routes`]).
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        let mut routes = Vec::new();
        for query in route_queries() {
            let answers = self
                .ask(RouteNetlinkMessage::GetRoute(query), true)
                .context("listing routes")?;
            routes.extend(answers.iter().filter_map(|a| match a {
                RouteNetlinkMessage::NewRoute(r) => main_unicast_route(r),
                _ => None,
            }));
        }
        Ok(routes)
    }

    /// Sends one request and collects its answers: the one answer, or every part of a dump
    /// up to its end. An error answer is the kernel's errno; a kernel that does not answer
    /// within [`REQUEST_TIMEOUT`] is an error too.
    fn ask(
        &mut self,
        message: RouteNetlinkMessage,
        dump: bool,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        use rtnetlink::packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
        self.sequence = self.sequence.wrapping_add(1);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        request.header.sequence_number = self.sequence;
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        let mut answers = Vec::new();
        loop {
            // A netlink datagram is at most 32 KiB; one that did not fit would be cut short.
            self.buffer.clear();
            self.buffer.reserve(64 << 10);
            let size = self.socket.recv(&mut self.buffer, 0).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the kernel did not answer a netlink request within {}s",
                            REQUEST_TIMEOUT.as_secs()
                        ),
                    )
                } else {
                    e
                }
            })?;
            let mut offset = 0;
            while offset < size {
                let answer =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buffer[offset..size])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = (answer.header.length as usize).next_multiple_of(4);
                if length == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "an empty netlink message",
                    ));
                }
                offset += length;
                if answer.header.sequence_number != self.sequence {
                    // The answer to an earlier request given up on.
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !dump {
                            return Ok(answers);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }
}

/// Tells when the namespace's way out may have changed: a default route or an address came or
/// went. Subscribed to rtnetlink's multicast groups, so nothing is polled. What is already
/// known and only refreshed (router advertisements renew IPv6 addresses and routes every few
/// minutes) is no change.
pub struct ChangeWatcher {
    netlink: Netlink,
    messages: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    known: std::collections::HashSet<WayOut>,
}

/// One part of the way out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum WayOut {
    Address {
        interface: u32,
        address: IpAddr,
        prefix: u8,
    },
    DefaultRoute {
        ipv6: bool,
        table: u32,
        gateway: Option<IpAddr>,
        interface: u32,
        priority: u32,
    },
}

impl ChangeWatcher {
    /// Watches the namespace the calling thread is in.
    pub fn here() -> Result<ChangeWatcher> {
        use rtnetlink::constants::{
            RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE,
        };
        use rtnetlink::sys::AsyncSocket;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("starting the netlink runtime")?;
        let groups =
            RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        let (mut connection, handle, messages) = {
            let _guard = runtime.enter();
            rtnetlink::new_connection().context("opening a netlink socket")?
        };
        connection
            .socket_mut()
            .socket_mut()
            .bind(&rtnetlink::sys::SocketAddr::new(0, groups))
            .context("subscribing to route and address changes")?;
        runtime.spawn(connection);
        let mut watcher = ChangeWatcher {
            netlink: Netlink { runtime, handle },
            messages,
            known: std::collections::HashSet::new(),
        };
        // Subscribed first, then listed: nothing that changes in between is missed.
        let nl = &watcher.netlink;
        let addresses = nl
            .block(async {
                nl.handle
                    .address()
                    .get()
                    .execute()
                    .map(|r| r.map_err(to_io))
                    .try_collect::<Vec<_>>()
                    .await
            })
            .context("listing addresses")?;
        let mut known: Vec<WayOut> = addresses
            .into_iter()
            .filter_map(|a| way_out(&RouteNetlinkMessage::NewAddress(a)))
            .map(|(part, _)| part)
            .collect();
        known.extend(
            nl.route_messages()?
                .into_iter()
                .filter_map(|r| way_out(&RouteNetlinkMessage::NewRoute(r)))
                .map(|(part, _)| part),
        );
        watcher.known.extend(known);
        Ok(watcher)
    }

    /// Waits up to `timeout` for a change; true when one came. Consumes every message that is
    /// already queued, so a storm of changes counts once. The wait is measured on
    /// CLOCK_BOOTTIME, which runs on while the machine sleeps: a wait that a suspend outlasted
    /// ends at resume. It also ends, with false, as soon as `stop` is readable.
    pub fn wait(&mut self, timeout: Duration, stop: BorrowedFd<'_>) -> Result<bool> {
        use futures::future::Either;
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
        let timer = TimerFd::new(
            ClockId::CLOCK_BOOTTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .context("making a CLOCK_BOOTTIME timer")?;
        // An expiry of zero would disarm the timer: a nanosecond is "at once".
        let expiry = TimeSpec::from_duration(timeout.max(Duration::from_nanos(1)));
        timer
            .set(Expiration::OneShot(expiry), TimerSetTimeFlags::empty())
            .context("setting a CLOCK_BOOTTIME timer")?;
        let (runtime, messages) = (&self.netlink.runtime, &mut self.messages);
        let first = runtime.block_on(async {
            // SAFETY: the descriptor is owned by the AsyncFd, so it stays open while it is
            // registered.
            let timer =
                unsafe { tokio::io::unix::AsyncFd::register(std::os::fd::OwnedFd::from(timer)) }
                    .map_err(io::Error::from)?;
            // SAFETY: `stop` is borrowed for longer than this wait, so it stays open while it
            // is registered.
            let stop = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    stop,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(io::Error::from)?;
            let message = messages.next();
            let expired = timer.readable();
            let stopped = stop.readable();
            futures::pin_mut!(message, expired, stopped);
            let woken = futures::future::select(expired, stopped);
            match futures::future::select(message, woken).await {
                Either::Left((message, _)) => Ok::<_, io::Error>(Some(message)),
                Either::Right((Either::Left((ready, _)), _)) => ready.map(|_| None),
                Either::Right((Either::Right((ready, _)), _)) => ready.map(|_| None),
            }
        })?;
        let mut changed = false;
        let mut next = match first {
            None => return Ok(false),
            Some(None) => anyhow::bail!("the netlink connection for change notices closed"),
            Some(Some(message)) => Some(message),
        };
        while let Some((message, _)) = next {
            if let rtnetlink::packet_core::NetlinkPayload::InnerMessage(inner) = &message.payload
                && let Some((part, added)) = way_out(inner)
            {
                changed |= if added {
                    self.known.insert(part)
                } else {
                    self.known.remove(&part);
                    true
                };
            }
            next = self.messages.try_recv().ok();
        }
        Ok(changed)
    }
}

/// The part of the way out a message is about, and whether it came (or went). Default routes
/// and addresses decide how (and whether) the endpoint is reached; other routes (a container
/// bridge's, a VPN's host route) and link-local addresses do not.
fn way_out(message: &RouteNetlinkMessage) -> Option<(WayOut, bool)> {
    match message {
        RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route) => {
            if route.header.destination_prefix_length != 0
                || route.header.kind != RouteType::Unicast
            {
                return None;
            }
            let mut table = u32::from(route.header.table);
            let (mut gateway, mut interface, mut priority) = (None, 0, 0);
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                        gateway = Some(IpAddr::V4(*a))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                        gateway = Some(IpAddr::V6(*a))
                    }
                    RouteAttribute::Oif(i) => interface = *i,
                    RouteAttribute::Priority(p) => priority = *p,
                    _ => {}
                }
            }
            let part = WayOut::DefaultRoute {
                ipv6: route.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6,
                table,
                gateway,
                interface,
                priority,
            };
            Some((part, matches!(message, RouteNetlinkMessage::NewRoute(_))))
        }
        RouteNetlinkMessage::NewAddress(address) | RouteNetlinkMessage::DelAddress(address) => {
            if address.header.scope != AddressScope::Universe {
                return None;
            }
            let local = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = local.or_else(|| {
                address.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })?;
            let part = WayOut::Address {
                interface: address.header.index,
                address: ip,
                prefix: address.header.prefix_len,
            };
            Some((part, matches!(message, RouteNetlinkMessage::NewAddress(_))))
        }
        _ => None,
    }
}

fn unreachable_route(prefix: Cidr) -> Result<rtnetlink::packet_route::route::RouteMessage> {
    let net = prefix.network();
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.addr, net.prefix)
        .with_context(|| format!("route to {net}"))?
        .kind(RouteType::Unreachable)
        .build())
}

#[cfg(test)]
mod tests {
    use super::Netlink;
    use std::time::{Duration, Instant};

    #[test]
    fn a_request_that_never_ends_times_out() {
        let nl = Netlink::here().expect("a netlink socket");
        let started = Instant::now();
        let result: std::io::Result<()> =
            nl.block_within(Duration::from_millis(200), std::future::pending());
        let error = result.expect_err("a request without an answer must fail");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
