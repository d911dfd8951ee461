//! The ruleset as the kernel holds it, read over nfnetlink (`NETLINK_NETFILTER`) in this
//! process: which tables exist, and a table's contents reduced to what decides verdicts.
//!
//! `status`, `heal` and the health timer judge the leak guard by comparing what the kernel holds
//! now with what it held right after wg-namespace loaded it (recorded in the state file). Reading
//! it is a handful of netlink requests, well under a millisecond, where an `nft` listing costs a
//! process and the rendered guard a throwaway namespace to load it into.
//!
//! Kept of a table is everything the kernel reports that decides verdicts: the table's flags (a
//! dormant table filters nothing), each chain's type, hook, priority and policy, every rule's
//! expressions in order, and the elements of the table's sets (the anonymous sets rules look
//! up). Left out is what differs between two loads of the same ruleset or grows with traffic:
//! handles, reference counts, counter values, the position attribute (a handle too).
//!
//! One write goes this way too: replacing a set's elements (the forwarded port), a batch of
//! two messages, so that `port-forward` need not load libnftables (and the libraries it pulls
//! in) into a process that lives as long as the namespace.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NlasIterator,
};
use serde::{Deserialize, Serialize};

use crate::system::netns;

/// How long the kernel may take to answer one request.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often a reading is made again when the ruleset changed while it was read.
const ATTEMPTS: usize = 5;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLA_F_NESTED: u16 = 0x8000;

// enum nf_tables_msg_types
const GETTABLE: u8 = 1;
const GETCHAIN: u8 = 4;
const GETRULE: u8 = 7;
const GETSET: u8 = 10;
const NEWSETELEM: u8 = 12;
const GETSETELEM: u8 = 13;
const DELSETELEM: u8 = 14;
const GETGEN: u8 = 16;

// Attributes (linux/netfilter/nf_tables.h).
const TABLE_NAME: u16 = 1;
const TABLE_FLAGS: u16 = 2;
/// use, handle, pad, owner (the netlink port of an owning process).
const TABLE_VOLATILE: &[u16] = &[3, 4, 5, 7];
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
/// table, handle, use, counters, pad, id.
const CHAIN_VOLATILE: &[u16] = &[1, 2, 6, 8, 9, 11];
const HOOK_NUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_HANDLE: u16 = 3;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
/// table, chain, handle, position, pad, id, position id, chain id.
const RULE_VOLATILE: &[u16] = &[1, 2, 3, 6, 8, 9, 10, 11];
const EXPR_NAME: u16 = 1;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
/// table, id, pad, handle.
const SET_VOLATILE: &[u16] = &[1, 10, 14, 16];
const SET_ELEM_LIST_TABLE: u16 = 1;
const SET_ELEM_LIST_SET: u16 = 2;
const SET_ELEM_LIST_ELEMENTS: u16 = 3;
/// expiration: how long a timed element has left.
const SET_ELEM_VOLATILE: &[u16] = &[5];
const GEN_ID: u16 = 1;
const LIST_ELEM: u16 = 1;
const SET_ELEM_KEY: u16 = 1;
const DATA_VALUE: u16 = 1;
/// libnftnl's user data: the rule's comment.
const UDATA_RULE_COMMENT: u8 = 0;

/// Netlink attributes in a canonical form (volatile ones left out), as bytes; hex in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes(Vec<u8>);

impl Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let text: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("not an even number of hex digits");
        if text.len() % 2 != 0 {
            return Err(bad());
        }
        (0..text.len())
            .step_by(2)
            .map(|i| {
                text.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .map(Attributes)
            .ok_or_else(bad)
    }
}

impl Attributes {
    /// The value of attribute `kind`.
    fn get(&self, kind: u16) -> Option<&[u8]> {
        find(&self.0, kind)
    }

    fn u32(&self, kind: u16) -> Option<u32> {
        Some(u32::from_be_bytes(
            self.get(kind)?.get(..4)?.try_into().ok()?,
        ))
    }
}

/// A table as [`read`] sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub head: Attributes,
    pub chains: Vec<Chain>,
    pub sets: Vec<Set>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub name: String,
    pub head: Attributes,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rule {
    pub body: Attributes,
    /// Which rule it is in the kernel now; not part of what is compared.
    #[serde(skip)]
    pub handle: Option<u64>,
}

impl PartialEq for Rule {
    fn eq(&self, other: &Rule) -> bool {
        self.body == other.body
    }
}

impl Eq for Rule {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    pub name: String,
    pub head: Attributes,
    /// Sorted: the kernel lists a hashed set's elements in an order of its own.
    pub elements: Vec<Attributes>,
}

impl Table {
    /// NFT_TABLE_F_*: 1 dormant, 2 owner, 4 persist.
    pub fn flags(&self) -> u32 {
        self.head.u32(TABLE_FLAGS).unwrap_or(0)
    }
}

impl Set {
    /// NFT_SET_TIMEOUT: its elements may expire, which changes the set without a new
    /// generation of the ruleset.
    pub fn timed(&self) -> bool {
        self.head.u32(SET_FLAGS).is_some_and(|f| f & 0x10 != 0)
    }
}

impl Chain {
    /// NF_DROP (0) or NF_ACCEPT (1); None for a regular chain.
    pub fn policy(&self) -> Option<u32> {
        self.head.u32(CHAIN_POLICY)
    }

    /// Type, hook number and priority; None for a regular chain.
    pub fn hook(&self) -> Option<(String, u32, i32)> {
        let hook = self.head.get(CHAIN_HOOK)?;
        let number = u32::from_be_bytes(find(hook, HOOK_NUM)?.get(..4)?.try_into().ok()?);
        let priority = i32::from_be_bytes(find(hook, HOOK_PRIORITY)?.get(..4)?.try_into().ok()?);
        let kind = string(self.head.get(CHAIN_TYPE).unwrap_or_default());
        Some((kind, number, priority))
    }
}

impl Rule {
    /// The comment nft stored with the rule.
    pub fn comment(&self) -> Option<String> {
        let mut data = self.body.get(RULE_USERDATA)?;
        while let [kind, length, rest @ ..] = data {
            let value = rest.get(..usize::from(*length))?;
            if *kind == UDATA_RULE_COMMENT {
                return Some(string(value));
            }
            data = &rest[value.len()..];
        }
        None
    }
}

/// What [`read`] found: the names of the inet tables, and the one table asked for.
#[derive(Debug)]
pub struct Reading {
    pub tables: Vec<String>,
    pub table: Option<Table>,
    /// The ruleset's generation id when it was read: every change to the namespace's ruleset
    /// moves it.
    pub generation: u32,
}

/// Reads the inet tables of the namespace `fd`, and the contents of the one named `table`. The
/// generation id before and after tells whether the ruleset changed meanwhile (a forwarded
/// port's set updated, a reload): then it is read again.
pub fn read(fd: impl AsFd, table: &str) -> Result<Reading> {
    read_unless(fd, table, None)?.context("the ruleset was not read")
}

/// [`read`] right after loading a ruleset (`up`, `reload`, `heal`), without waiting for the
/// kernel to clean up after that load. Closing an nfnetlink socket waits until the kernel has
/// finished the cleanup of the last nf_tables commit, an RCU grace period (5-10 ms here; it
/// made `up` that much slower). The socket is kept instead, and closed when the next one is
/// kept or when the process ends, by which time there is nothing left to wait for. Only for
/// processes that end soon: a kept socket keeps its network namespace alive.
pub fn read_after_load(fd: impl AsFd, table: &str) -> Result<Reading> {
    static KEPT: Mutex<Option<OwnedFd>> = Mutex::new(None);
    let mut socket = Socket::inside(fd)?;
    let reading = socket.consistent_reading(table, None)?;
    let previous = KEPT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(socket.fd);
    drop(previous);
    reading.context("the ruleset was not read")
}

/// [`read`], unless the ruleset's generation is still `known`: then `None`, for one request
/// instead of a dozen.
pub fn read_unless(fd: impl AsFd, table: &str, known: Option<u32>) -> Result<Option<Reading>> {
    Socket::inside(fd)?.consistent_reading(table, known)
}

impl Socket {
    /// A reading during which the ruleset's generation stayed the same; `None` when it is
    /// still `known`.
    fn consistent_reading(&mut self, table: &str, known: Option<u32>) -> Result<Option<Reading>> {
        let socket = self;
        for _ in 0..ATTEMPTS {
            let before = socket.generation()?;
            if known == Some(before) {
                return Ok(None);
            }
            let mut reading = socket.reading(table)?;
            if socket.generation()? == before {
                reading.generation = before;
                return Ok(Some(reading));
            }
        }
        bail!("the ruleset kept changing while it was read ({ATTEMPTS} times)")
    }
}

/// The keys of the elements of the set `set` in the inet table `table` of the namespace `fd`,
/// as the kernel keeps them (a concatenation's fields each padded to four bytes).
pub fn element_keys(fd: impl AsFd, table: &str, set: &str) -> Result<Vec<Vec<u8>>> {
    let mut socket = Socket::inside(fd)?;
    let mut keys = Vec::new();
    for answer in socket.ask(
        GETSETELEM,
        NLM_F_DUMP,
        &[
            (SET_ELEM_LIST_TABLE, &nul_terminated(table)),
            (SET_ELEM_LIST_SET, &nul_terminated(set)),
        ],
    )? {
        let Some(list) = find(&answer, SET_ELEM_LIST_ELEMENTS) else {
            continue;
        };
        for element in attributes(list) {
            let (_, element) = element?;
            let key = find(element, SET_ELEM_KEY)
                .and_then(|key| find(key, DATA_VALUE))
                .context("a set element without a key")?;
            keys.push(key.to_vec());
        }
    }
    Ok(keys)
}

/// Makes the set `set` of the inet table `table` in the namespace `fd` hold exactly the
/// elements `keys` (as [`element_keys`] gives them), in one transaction: the flush and the new
/// elements are one batch, so no one sees the set empty or half filled, and a failure leaves
/// it as it was.
pub fn replace_elements(fd: impl AsFd, table: &str, set: &str, keys: &[Vec<u8>]) -> Result<()> {
    Socket::inside(fd)?.replace_elements(table, set, keys)
}

/// The names of the inet tables of the namespace `fd`.
pub fn tables(fd: impl AsFd) -> Result<Vec<String>> {
    Socket::inside(fd)?.table_names()
}

struct Socket {
    fd: OwnedFd,
    sequence: u32,
}

impl Socket {
    /// A socket of the namespace `fd` (a netlink socket belongs to the namespace it is made in).
    fn inside(fd: impl AsFd) -> Result<Socket> {
        let fd = netns::within(fd, || {
            socket::socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkNetFilter,
            )
        })?
        .context("opening an nfnetlink socket")?;
        let timeout = nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as _, 0);
        socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeout)
            .context("setting the nfnetlink socket's timeout")?;
        Ok(Socket { fd, sequence: 0 })
    }

    fn generation(&mut self) -> Result<u32> {
        let answers = self.ask(GETGEN, 0, &[])?;
        answers
            .first()
            .and_then(|a| find(a, GEN_ID))
            .and_then(|v| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)))
            .context("the kernel's answer holds no ruleset generation")
    }

    fn table_names(&mut self) -> Result<Vec<String>> {
        Ok(self
            .ask(GETTABLE, NLM_F_DUMP, &[])?
            .iter()
            .filter_map(|t| find(t, TABLE_NAME).map(string))
            .collect())
    }

    fn reading(&mut self, name: &str) -> Result<Reading> {
        let tables = self.ask(GETTABLE, NLM_F_DUMP, &[])?;
        let names = tables
            .iter()
            .filter_map(|t| find(t, TABLE_NAME).map(string))
            .collect();
        let Some(head) = tables
            .iter()
            .find(|t| find(t, TABLE_NAME).map(string).as_deref() == Some(name))
        else {
            return Ok(Reading {
                tables: names,
                table: None,
                generation: 0,
            });
        };
        let key = nul_terminated(name);
        let ours = |kind: u16, a: &Vec<u8>| find(a, kind) == Some(&key[..]);
        let mut chains: Vec<Chain> = self
            .ask(GETCHAIN, NLM_F_DUMP, &[(CHAIN_TABLE, &key)])?
            .iter()
            .filter(|a| ours(CHAIN_TABLE, a))
            .map(|a| Chain {
                name: find(a, CHAIN_NAME).map(string).unwrap_or_default(),
                head: Attributes(without(a, CHAIN_VOLATILE)),
                rules: Vec::new(),
            })
            .collect();
        for rule in self
            .ask(GETRULE, NLM_F_DUMP, &[(RULE_TABLE, &key)])?
            .iter()
            .filter(|a| ours(RULE_TABLE, a))
        {
            let chain = find(rule, RULE_CHAIN).map(string).unwrap_or_default();
            let handle = find(rule, RULE_HANDLE)
                .and_then(|v| Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?)));
            let entry = Rule {
                body: Attributes(normalized_rule(rule)?),
                handle,
            };
            match chains.iter_mut().find(|c| c.name == chain) {
                Some(c) => c.rules.push(entry),
                // Listed between the two dumps: the generation check makes it read again.
                None => chains.push(Chain {
                    name: chain,
                    head: Attributes::default(),
                    rules: vec![entry],
                }),
            }
        }
        let mut sets = Vec::new();
        for set in self
            .ask(GETSET, NLM_F_DUMP, &[(SET_TABLE, &key)])?
            .iter()
            .filter(|a| ours(SET_TABLE, a))
        {
            let set_name = find(set, SET_NAME).map(string).unwrap_or_default();
            let mut elements = Vec::new();
            for answer in self.ask(
                GETSETELEM,
                NLM_F_DUMP,
                &[
                    (SET_ELEM_LIST_TABLE, &key),
                    (SET_ELEM_LIST_SET, &nul_terminated(&set_name)),
                ],
            )? {
                let Some(list) = find(&answer, SET_ELEM_LIST_ELEMENTS) else {
                    continue;
                };
                for element in attributes(list) {
                    let (_, value) = element?;
                    elements.push(Attributes(without(value, SET_ELEM_VOLATILE)));
                }
            }
            elements.sort_by(|a, b| a.0.cmp(&b.0));
            sets.push(Set {
                name: set_name,
                head: Attributes(without(set, SET_VOLATILE)),
                elements,
            });
        }
        Ok(Reading {
            tables: names,
            table: Some(Table {
                head: Attributes(without(head, TABLE_VOLATILE)),
                chains,
                sets,
            }),
            generation: 0,
        })
    }

    /// Appends one message to `out`: its netlink header (type, flags, the next sequence
    /// number, which it returns), the nfgenmsg header (`family`, version 0, `resource`) and
    /// `body`, the message's attributes.
    fn frame(
        &mut self,
        out: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        family: u8,
        resource: u16,
        body: &[u8],
    ) -> Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let length = u32::try_from(20 + body.len()).context("request too long")?;
        out.extend_from_slice(&length.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        out.extend_from_slice(&self.sequence.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, 0]);
        out.extend_from_slice(&resource.to_be_bytes());
        out.extend_from_slice(body);
        Ok(self.sequence)
    }

    fn send(&self, request: &[u8]) -> Result<()> {
        let kernel = socket::NetlinkAddr::new(0, 0);
        socket::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            request,
            &kernel,
            MsgFlags::empty(),
        )
        .context("sending an nfnetlink request")?;
        Ok(())
    }

    /// One datagram of answers into `buffer`; its length.
    fn receive(&self, buffer: &mut [u8]) -> Result<usize> {
        socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            buffer,
            MsgFlags::empty(),
        )
        .map_err(|e| match e {
            nix::errno::Errno::EAGAIN => anyhow::anyhow!(
                "the kernel did not answer an nfnetlink request within {} s",
                TIMEOUT.as_secs()
            ),
            e => anyhow::Error::new(e).context("reading an nfnetlink answer"),
        })
    }

    /// The batch of [`replace_elements`]: flush (a DELSETELEM naming no element), then one
    /// NEWSETELEM with every key, each acknowledged.
    fn replace_elements(&mut self, table: &str, set: &str, keys: &[Vec<u8>]) -> Result<()> {
        let mut names = Vec::new();
        put(&mut names, SET_ELEM_LIST_TABLE, &nul_terminated(table));
        put(&mut names, SET_ELEM_LIST_SET, &nul_terminated(set));
        let subsystem = NFNL_SUBSYS_NFTABLES << 8;
        let mut batch = Vec::new();
        let first = self.frame(
            &mut batch,
            NFNL_MSG_BATCH_BEGIN,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        )?;
        let mut pending = vec![self.frame(
            &mut batch,
            subsystem | u16::from(DELSETELEM),
            NLM_F_ACK,
            NFPROTO_INET,
            0,
            &names,
        )?];
        if !keys.is_empty() {
            let mut elements = Vec::new();
            for key in keys {
                let mut value = Vec::new();
                put(&mut value, DATA_VALUE, key);
                let mut element = Vec::new();
                put(&mut element, SET_ELEM_KEY | NLA_F_NESTED, &value);
                put(&mut elements, LIST_ELEM | NLA_F_NESTED, &element);
            }
            let mut body = names.clone();
            put(&mut body, SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &elements);
            pending.push(self.frame(
                &mut batch,
                subsystem | u16::from(NEWSETELEM),
                NLM_F_CREATE | NLM_F_ACK,
                NFPROTO_INET,
                0,
                &body,
            )?);
        }
        let last = self.frame(
            &mut batch,
            NFNL_MSG_BATCH_END,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        )?;
        self.send(&batch)?;
        let mut buffer = vec![0u8; 8 << 10];
        while !pending.is_empty() {
            let received = self.receive(&mut buffer)?;
            for message in messages(&buffer[..received]) {
                let message = message?;
                let sequence = message.sequence_number();
                // Acknowledgements come for the two acked messages; an error for any of the
                // batch's (its begin and end included) means the batch was refused.
                if message.message_type() == NLMSG_ERROR && (first..=last).contains(&sequence) {
                    error_code(message.payload()).with_context(|| {
                        format!("the kernel refused to change the set {set} of table {table}")
                    })?;
                    pending.retain(|&s| s != sequence);
                }
            }
        }
        Ok(())
    }

    /// Sends one request (family inet) and collects the attributes of every answer, after
    /// their nfgenmsg header. An error answer is the kernel's errno.
    fn ask(
        &mut self,
        message: u8,
        flags: u16,
        attributes: &[(u16, &[u8])],
    ) -> Result<Vec<Vec<u8>>> {
        let mut body = Vec::new();
        for (kind, value) in attributes {
            put(&mut body, *kind, value);
        }
        let mut request = Vec::with_capacity(20 + body.len());
        self.frame(
            &mut request,
            NFNL_SUBSYS_NFTABLES << 8 | u16::from(message),
            flags,
            NFPROTO_INET,
            0,
            &body,
        )?;
        self.send(&request)?;
        let dump = flags & NLM_F_DUMP != 0;
        let mut answers = Vec::new();
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let received = self.receive(&mut buffer)?;
            for message in messages(&buffer[..received]) {
                let message = message?;
                if message.sequence_number() != self.sequence {
                    continue;
                }
                let payload = message.payload();
                match message.message_type() {
                    NLMSG_DONE => return Ok(answers),
                    NLMSG_ERROR => {
                        error_code(payload).context("the kernel refused an nfnetlink request")?;
                        return Ok(answers);
                    }
                    _ => {
                        answers.push(payload.get(4..).unwrap_or_default().to_vec());
                        if !dump {
                            return Ok(answers);
                        }
                    }
                }
            }
        }
    }
}

/// A rule's attributes without the volatile ones, its counters' values left out.
fn normalized_rule(rule: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for attribute in raw_attributes(rule) {
        let (raw_kind, value) = attribute?;
        let kind = raw_kind & rtnetlink::packet_core::NLA_TYPE_MASK;
        if RULE_VOLATILE.contains(&kind) {
            continue;
        }
        if kind != RULE_EXPRESSIONS {
            put(&mut out, raw_kind, value);
            continue;
        }
        let mut expressions = Vec::new();
        for element in raw_attributes(value) {
            let (element_kind, expression) = element?;
            let name = find(expression, EXPR_NAME).map(string);
            if name.as_deref() == Some("counter") {
                let mut bare = Vec::new();
                put(
                    &mut bare,
                    EXPR_NAME,
                    find(expression, EXPR_NAME).unwrap_or_default(),
                );
                put(&mut expressions, element_kind, &bare);
            } else {
                put(&mut expressions, element_kind, expression);
            }
        }
        put(&mut out, raw_kind, &expressions);
    }
    Ok(out)
}

/// `data`'s attributes but those of the kinds in `volatile`, as they were.
fn without(data: &[u8], volatile: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    for (raw_kind, value) in raw_attributes(data).map_while(|a| a.ok()) {
        if !volatile.contains(&(raw_kind & rtnetlink::packet_core::NLA_TYPE_MASK)) {
            put(&mut out, raw_kind, value);
        }
    }
    out
}

/// Attributes as (type with its flags, value).
fn raw_attributes(data: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8])>> {
    NlasIterator::new(data).map(|nla| {
        let nla = nla.context("reading an nfnetlink attribute")?;
        let bytes = nla.into_inner();
        let raw_kind = u16::from_ne_bytes([bytes[2], bytes[3]]);
        let length = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        Ok((raw_kind, &bytes[4..length]))
    })
}

/// Attributes as (type, value).
fn attributes(data: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8])>> {
    raw_attributes(data)
        .map(|a| a.map(|(kind, value)| (kind & rtnetlink::packet_core::NLA_TYPE_MASK, value)))
}

fn find(data: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(data)
        .map_while(|a| a.ok())
        .find_map(|(k, value)| (k == kind).then_some(value))
}

fn put(out: &mut Vec<u8>, raw_kind: u16, value: &[u8]) {
    let length = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&length.to_ne_bytes());
    out.extend_from_slice(&raw_kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align(out.len()), 0);
}

/// The netlink messages one datagram holds, in order; a malformed one ends it.
fn messages(mut data: &[u8]) -> impl Iterator<Item = Result<NetlinkBuffer<&[u8]>>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let message = NetlinkBuffer::new_checked(data);
        let Ok(message) = message else {
            data = &[];
            return Some(message.context("reading an nfnetlink answer"));
        };
        data = data
            .get(align(message.length() as usize)..)
            .unwrap_or_default();
        Some(Ok(message))
    })
}

/// An NLMSG_ERROR's errno: Ok for 0 (an acknowledgement), the error otherwise.
fn error_code(payload: &[u8]) -> Result<()> {
    let code = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("four bytes")))
        .context("a short nfnetlink error")?;
    if code != 0 {
        return Err(std::io::Error::from_raw_os_error(-code).into());
    }
    Ok(())
}

fn align(length: usize) -> usize {
    (length + 3) & !3
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// A string attribute without its terminating NUL.
fn string(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(packets: u64) -> Vec<u8> {
        let mut data = Vec::new();
        put(&mut data, 1, &(packets * 60).to_be_bytes());
        put(&mut data, 2, &packets.to_be_bytes());
        let mut expression = Vec::new();
        put(&mut expression, EXPR_NAME, b"counter\0");
        put(&mut expression, 2 | 0x8000, &data);
        expression
    }

    fn rule(handle: u64, packets: u64) -> Vec<u8> {
        let mut verdict = Vec::new();
        put(&mut verdict, EXPR_NAME, b"immediate\0");
        let mut list = Vec::new();
        put(&mut list, LIST_ELEM | 0x8000, &counter(packets));
        put(&mut list, LIST_ELEM | 0x8000, &verdict);
        let mut rule = Vec::new();
        put(&mut rule, RULE_TABLE, b"t\0");
        put(&mut rule, RULE_CHAIN, b"output\0");
        put(&mut rule, RULE_HANDLE, &handle.to_be_bytes());
        put(&mut rule, RULE_EXPRESSIONS | 0x8000, &list);
        put(
            &mut rule,
            RULE_USERDATA,
            &[0, 6, b'm', b'D', b'N', b'S', b'!', 0],
        );
        rule
    }

    #[test]
    fn handles_and_counters_do_not_count() {
        let first = normalized_rule(&rule(4, 0)).unwrap();
        assert_eq!(first, normalized_rule(&rule(9, 1234)).unwrap());
        assert_eq!(find(&first, RULE_HANDLE), None);
        let kept = Rule {
            body: Attributes(first),
            handle: None,
        };
        assert_eq!(kept.comment().as_deref(), Some("mDNS!"));
        let json = serde_json::to_string(&kept).unwrap();
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), kept);
    }
}
