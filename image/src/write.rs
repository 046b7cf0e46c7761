//! Writing an image's header page and metadata tail: the one encoding every writer of images
//! uses (the shim's flush, `snapshim merge`). Page data goes first, from offset [`PAGE_SIZE`];
//! then [`tail`] gives the metadata to write where the data ends and the header page that
//! describes both, which is written last, at offset 0.

use crate::{encode_metadata, Header, Metadata, FLAG_DELTA, PAGE_SIZE};

/// The end of an image: its metadata and the header page naming it.
pub struct Tail {
    /// The encoded metadata, to write at `meta_off`.
    pub meta: Vec<u8>,
    pub meta_off: u64,
    /// The header page, to write at offset 0.
    pub header: Vec<u8>,
}

impl Tail {
    /// The image file's length once both are written.
    pub fn file_len(&self) -> u64 {
        self.meta_off + self.meta.len() as u64
    }
}

/// Encodes `meta` to follow page data that ends at file offset `data_end`, and the header page
/// of image `image_id`, taken at `created_ns` (wall clock). Metadata with a parent makes a
/// delta image: the header gets [`FLAG_DELTA`] and the parent's identity.
pub fn tail(meta: &Metadata, image_id: u64, created_ns: u64, data_end: u64) -> Tail {
    let (bytes, meta_crc) = encode_metadata(meta);
    let mut h = Header::new(image_id, created_ns);
    if let Some(p) = &meta.parent {
        h.flags |= FLAG_DELTA;
        h.parent_id = p.image_id;
    }
    h.data_len = data_end - PAGE_SIZE;
    h.meta_off = data_end;
    h.meta_len = bytes.len() as u64;
    h.meta_crc = meta_crc;
    Tail {
        meta: bytes,
        meta_off: data_end,
        header: h.encode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParentRef, Process, ShimInfo};

    fn meta(parent: Option<ParentRef>) -> Metadata {
        Metadata {
            process: Process {
                pid: 7,
                ..Default::default()
            },
            shim: ShimInfo::default(),
            threads: vec![],
            regions: vec![],
            runs: vec![],
            fds: vec![],
            clock_boottime_ns: 1,
            build_ids: vec![],
            vdso: Default::default(),
            parent,
            inherited: vec![],
            merged_from: None,
            lineage: None,
            credentials: Vec::new(),
        }
    }

    #[test]
    fn header_describes_the_metadata_after_the_data() {
        let m = meta(None);
        let t = tail(&m, 0x1234, 99, PAGE_SIZE + 3 * PAGE_SIZE);
        let h = Header::decode(&t.header).unwrap();
        assert_eq!(t.header.len() as u64, PAGE_SIZE);
        assert_eq!(
            (h.image_id, h.created_ns, h.flags, h.parent_id),
            (0x1234, 99, 0, 0)
        );
        assert_eq!((h.data_off, h.data_len), (PAGE_SIZE, 3 * PAGE_SIZE));
        assert_eq!(
            (h.meta_off, h.meta_len),
            (4 * PAGE_SIZE, t.meta.len() as u64)
        );
        assert_eq!(t.file_len(), 4 * PAGE_SIZE + t.meta.len() as u64);
        assert_eq!((t.meta.clone(), h.meta_crc), encode_metadata(&m));
    }

    #[test]
    fn metadata_with_a_parent_makes_a_delta() {
        let parent = ParentRef {
            image_id: 0xabc,
            meta_crc: 5,
            file: "ckpt-00000001.snap".into(),
        };
        let t = tail(&meta(Some(parent)), 1, 2, PAGE_SIZE);
        let h = Header::decode(&t.header).unwrap();
        assert_eq!((h.flags & FLAG_DELTA, h.parent_id), (FLAG_DELTA, 0xabc));
        assert_eq!(h.data_len, 0);
    }
}
