//! A small MaxMind DB writer, so tests and demos can make GeoIP databases
//! with known answers instead of depending on a downloaded file.
//!
//! It writes IPv6 trees (IPv4 networks live under `::/96`, as readers expect)
//! with 32-bit records, and the data types GeoIP records use.

use std::collections::BTreeMap;

use ipnet::IpNet;

/// A value in the data section.
#[derive(Debug, Clone, PartialEq)]
pub enum MmdbValue {
    /// UTF-8 string.
    Str(String),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Array.
    Array(Vec<MmdbValue>),
    /// Map with string keys.
    Map(BTreeMap<String, MmdbValue>),
}

impl MmdbValue {
    /// A map from pairs, for terse fixtures.
    pub fn map<const N: usize>(pairs: [(&str, MmdbValue); N]) -> Self {
        MmdbValue::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// A string value.
    pub fn str(s: &str) -> Self {
        MmdbValue::Str(s.to_owned())
    }
}

fn control(out: &mut Vec<u8>, type_num: u8, size: usize) {
    let (size_bits, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65536 {
        let s = size - 285;
        (30, vec![(s >> 8) as u8, s as u8])
    } else {
        let s = size - 65821;
        (31, vec![(s >> 16) as u8, (s >> 8) as u8, s as u8])
    };
    if type_num <= 7 {
        out.push((type_num << 5) | size_bits);
    } else {
        out.push(size_bits);
        out.push(type_num - 7);
    }
    out.extend(extra);
}

fn uint_bytes(v: u64) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

fn encode(value: &MmdbValue, out: &mut Vec<u8>) {
    match value {
        MmdbValue::Str(s) => {
            control(out, 2, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        MmdbValue::U16(v) => {
            let b = uint_bytes(u64::from(*v));
            control(out, 5, b.len());
            out.extend(b);
        }
        MmdbValue::U32(v) => {
            let b = uint_bytes(u64::from(*v));
            control(out, 6, b.len());
            out.extend(b);
        }
        MmdbValue::U64(v) => {
            let b = uint_bytes(*v);
            control(out, 9, b.len());
            out.extend(b);
        }
        MmdbValue::Array(items) => {
            control(out, 11, items.len());
            for i in items {
                encode(i, out);
            }
        }
        MmdbValue::Map(map) => {
            control(out, 7, map.len());
            for (k, v) in map {
                encode(&MmdbValue::Str(k.clone()), out);
                encode(v, out);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Empty,
    Node(u32),
    Data(u32),
}

/// Builds a database in memory.
pub struct MmdbWriter {
    database_type: String,
    nodes: Vec<[Slot; 2]>,
    data: Vec<u8>,
}

impl MmdbWriter {
    /// An empty database of the given type (e.g. `GeoIP2-City`).
    pub fn new(database_type: &str) -> Self {
        MmdbWriter {
            database_type: database_type.to_owned(),
            nodes: vec![[Slot::Empty, Slot::Empty]],
            data: Vec::new(),
        }
    }

    /// Maps every address in `net` to `value`. Networks must not nest.
    pub fn insert(&mut self, net: IpNet, value: &MmdbValue) {
        let offset = self.data.len() as u32;
        encode(value, &mut self.data);
        let (bits, prefix): (u128, u32) = match net {
            IpNet::V4(n) => (u128::from(u32::from(n.network())), 96 + u32::from(n.prefix_len())),
            IpNet::V6(n) => (u128::from(n.network()), u32::from(n.prefix_len())),
        };
        let mut node = 0usize;
        for depth in 0..prefix {
            let bit = ((bits >> (127 - depth)) & 1) as usize;
            if depth + 1 == prefix {
                self.nodes[node][bit] = Slot::Data(offset);
                return;
            }
            node = match self.nodes[node][bit] {
                Slot::Node(n) => n as usize,
                _ => {
                    self.nodes.push([Slot::Empty, Slot::Empty]);
                    let n = self.nodes.len() - 1;
                    self.nodes[node][bit] = Slot::Node(n as u32);
                    n
                }
            };
        }
    }

    /// The database file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let node_count = self.nodes.len() as u32;
        let mut out = Vec::with_capacity(self.nodes.len() * 8 + self.data.len() + 256);
        for node in &self.nodes {
            for slot in node {
                let v = match *slot {
                    Slot::Empty => node_count,
                    Slot::Node(n) => n,
                    Slot::Data(off) => node_count + 16 + off,
                };
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        let meta = MmdbValue::map([
            ("binary_format_major_version", MmdbValue::U16(2)),
            ("binary_format_minor_version", MmdbValue::U16(0)),
            ("build_epoch", MmdbValue::U64(1_700_000_000)),
            ("database_type", MmdbValue::Str(self.database_type.clone())),
            (
                "description",
                MmdbValue::map([("en", MmdbValue::str("Marsad test database"))]),
            ),
            ("ip_version", MmdbValue::U16(6)),
            ("languages", MmdbValue::Array(vec![MmdbValue::str("en")])),
            ("node_count", MmdbValue::U32(node_count)),
            ("record_size", MmdbValue::U16(32)),
        ]);
        encode(&meta, &mut out);
        out
    }
}
