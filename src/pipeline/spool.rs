//! The on-disk spool: a bounded, append-only log of outgoing MQTT messages that survives a crash.
//!
//! In: `(topic, payload)` records from the publish stage ([`Spool::append`]), acknowledgements
//! ([`Spool::ack`]). Out: the unacknowledged records, oldest first ([`Spool::read_next`]), after a restart too.
//!
//! Layout of the directory:
//! ```text
//! lock                          held (flock) while a daemon uses the spool
//! acked                         "next unacknowledged id" as decimal text, replaced atomically (tmp + rename)
//! seg-00000000000000000042.log  records with ids 42, 43, …, appended in order
//! ```
//! A record is `len: u32 LE | crc32(body): u32 LE | body`, body = `id: u64 LE | topic_len: u16 LE | topic |
//! payload`. Ids are consecutive across segments, so a segment's name says where it starts.
//!
//! Durability: every batch is written to the OS (`write(2)`) before anything is sent to the broker, so a killed
//! daemon (SIGKILL, panic, OOM) loses nothing. `fsync` runs at most every `fsync_interval` (0 = after every
//! batch): a power cut can lose up to that much. A torn last record (crash mid-write) fails its length or CRC
//! check on reopen and is cut off. The `acked` cursor is written at most every [`ACK_PERSIST_INTERVAL`] and
//! whenever the publisher loses the broker or stops, so after a crash at most that much delivered data is sent
//! again (a duplicate, never a loss).
//!
//! Bound: the segment files together stay under `max_bytes` (plus one record). When a new record would go over,
//! the oldest segment (about 1/8 of the spool) is deleted and its records that were never read are counted in
//! [`Spool::take_dropped`]; records already read (in flight) are the caller's to count if their acknowledgement
//! never comes. Memory use does not depend on the spool size: only segment names and sizes are kept.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the acknowledgement cursor is written to disk at most.
pub const ACK_PERSIST_INTERVAL: Duration = Duration::from_millis(200);

const HEADER: usize = 8;
/// Larger than any MQTT packet we send (the client's limit is 1 MiB); anything bigger is a torn length.
const MAX_RECORD: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "spool directory {0} is in use by another emotiond process (same MQTT client id); give each daemon its own \
         `mqtt.spool_dir` or `mqtt.client_id`"
    )]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One spooled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct Segment {
    first_id: u64,
    records: u64,
    bytes: u64,
    path: PathBuf,
}

impl Segment {
    fn end_id(&self) -> u64 {
        self.first_id + self.records
    }
}

/// Where the next [`Spool::read_next`] continues.
struct ReadCursor {
    id: u64,
    /// Open reader positioned at record `id`, in the segment that holds it.
    reader: Option<(u64, BufReader<File>)>,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    fsync_interval: Duration,
    segments: VecDeque<Segment>,
    /// Appends go to the last segment through this writer.
    writer: Option<BufWriter<File>>,
    unflushed: bool,
    unsynced: bool,
    last_sync: Instant,
    next_id: u64,
    /// Every id below this was delivered.
    acked: u64,
    acked_on_disk: u64,
    last_ack_write: Instant,
    total_bytes: u64,
    dropped: u64,
    read: ReadCursor,
    _lock: File,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("next_id", &self.next_id)
            .field("acked", &self.acked)
            .field("bytes", &self.total_bytes)
            .finish()
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering from a crash: torn tails are cut off, delivered
    /// segments deleted. Fails if another process holds the directory.
    pub fn open(dir: &Path, max_bytes: u64, fsync_interval: Duration) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.to_owned())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let acked_path = dir.join("acked");
        let acked: u64 = fs::read_to_string(&acked_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_prefix("seg-")
                .and_then(|s| s.strip_suffix(".log"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                names.push((id, entry.path()));
            }
        }
        names.sort();

        let mut segments = VecDeque::new();
        let mut expected: Option<u64> = None;
        for (first_id, path) in names {
            // A gap (a segment deleted by hand) is tolerated: ids only need to increase.
            if expected.is_some_and(|e| first_id < e) {
                tracing::warn!(path = %path.display(), "Spool segment overlaps the previous one; ignoring it.");
                let _ = fs::remove_file(&path);
                continue;
            }
            let (records, bytes) = scan_segment(&path, first_id)?;
            let seg = Segment {
                first_id,
                records,
                bytes,
                path,
            };
            expected = Some(seg.end_id());
            if seg.records == 0 || seg.end_id() <= acked {
                let _ = fs::remove_file(&seg.path);
                continue;
            }
            segments.push_back(seg);
        }
        let next_id = expected.unwrap_or(0).max(acked);
        let acked = segments
            .front()
            .map_or(acked, |s: &Segment| acked.max(s.first_id));
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let segment_bytes = (max_bytes / 8).clamp(4096, 8 << 20);
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            fsync_interval,
            segments,
            writer: None,
            unflushed: false,
            unsynced: false,
            last_sync: Instant::now(),
            next_id,
            acked,
            acked_on_disk: acked,
            last_ack_write: Instant::now(),
            total_bytes,
            dropped: 0,
            read: ReadCursor {
                id: acked,
                reader: None,
            },
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Messages not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.next_id - self.acked
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The first id not yet acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The id the next append gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Records dropped to stay within the bound, before they were ever read, since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Appends a record (buffered: call [`Spool::flush`] after a batch); returns its id.
    pub fn append(&mut self, topic: &str, payload: &[u8]) -> Result<u64, SpoolError> {
        let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
        let topic = &topic[..topic_len as usize];
        let body_len = 8 + 2 + topic.len() + payload.len();
        let rec_len = (HEADER + body_len) as u64;
        let needs_new = match self.segments.back() {
            Some(s) => self.writer.is_none() || s.bytes + rec_len > self.segment_bytes,
            None => true,
        };
        if needs_new {
            self.rotate()?;
        }
        // Keep the bound: drop the oldest segments (never the one being written).
        while self.total_bytes + rec_len > self.max_bytes && self.segments.len() > 1 {
            self.drop_oldest();
        }
        let id = self.next_id;
        let mut body = Vec::with_capacity(body_len);
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&topic_len.to_le_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        let seg = self
            .segments
            .back_mut()
            .expect("rotate made a segment: this is a bug");
        let w = self
            .writer
            .as_mut()
            .expect("rotate opened a writer: this is a bug");
        let res = (|| {
            w.write_all(&(body.len() as u32).to_le_bytes())?;
            w.write_all(&crc32(&body).to_le_bytes())?;
            w.write_all(&body)
        })();
        if let Err(e) = res {
            // The segment may now end in a partial record: start a new one next time; reopen truncates it.
            self.writer = None;
            return Err(io_err(&seg.path)(e));
        }
        seg.records += 1;
        seg.bytes += rec_len;
        self.total_bytes += rec_len;
        self.next_id += 1;
        self.unflushed = true;
        Ok(id)
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        if let Some(mut w) = self.writer.take() {
            let path = &self.segments.back().expect("writer has a segment").path;
            w.flush().map_err(io_err(path))?;
            if self.unsynced {
                w.get_ref().sync_data().map_err(io_err(path))?;
            }
        }
        let path = self.dir.join(format!("seg-{:020}.log", self.next_id));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // An empty leftover with this name (a crash right after creating it) is simply reused.
        let bytes = file.metadata().map_err(io_err(&path))?.len();
        if bytes != 0 {
            file.set_len(0).map_err(io_err(&path))?;
        }
        // Make the new file's directory entry durable with the next fsync.
        self.segments.push_back(Segment {
            first_id: self.next_id,
            records: 0,
            bytes: 0,
            path,
        });
        self.writer = Some(BufWriter::with_capacity(64 << 10, file));
        Ok(())
    }

    fn drop_oldest(&mut self) {
        let Some(seg) = self.segments.pop_front() else {
            return;
        };
        // Records below the read cursor were handed to the client and may still be acknowledged: the caller
        // settles those (it knows what is in flight). Here only the never-sent ones count.
        let unsent = seg
            .end_id()
            .saturating_sub(self.acked.max(self.read.id).max(seg.first_id));
        self.dropped += unsent;
        self.total_bytes -= seg.bytes;
        let _ = fs::remove_file(&seg.path);
        if self.acked < seg.end_id() {
            self.acked = seg.end_id();
        }
        if self.read.id < seg.end_id() {
            self.read.id = seg.end_id();
            self.read.reader = None;
        }
    }

    /// Hands buffered appends to the OS (a killed process then loses nothing) and fsyncs when the interval is
    /// up. Call after each batch; cheap when there is nothing to do.
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if self.unflushed {
            if let Some(w) = self.writer.as_mut() {
                let path = &self.segments.back().expect("writer has a segment").path;
                w.flush().map_err(io_err(path))?;
            }
            self.unflushed = false;
            self.unsynced = true;
        }
        if self.unsynced && self.last_sync.elapsed() >= self.fsync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// fsync the segment being written now.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if let Some(w) = self.writer.as_mut() {
            let path = &self.segments.back().expect("writer has a segment").path;
            w.flush().map_err(io_err(path))?;
            w.get_ref().sync_data().map_err(io_err(path))?;
        }
        self.unflushed = false;
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Whether an fsync is owed (for a timer in the caller).
    pub fn sync_due(&self) -> bool {
        self.unsynced && self.last_sync.elapsed() >= self.fsync_interval
    }

    /// Reads up to `max` records from the read cursor on, oldest first; the cursor moves past them.
    pub fn read_next(&mut self, max: usize) -> Result<Vec<Record>, SpoolError> {
        let mut out = Vec::new();
        if max == 0 || self.read.id >= self.next_id {
            return Ok(out);
        }
        if self.unflushed {
            self.flush()?;
        }
        if self.read.id < self.acked {
            self.read.id = self.acked;
            self.read.reader = None;
        }
        let dir = self.dir.clone();
        while out.len() < max && self.read.id < self.next_id {
            let id = self.read.id;
            let valid = self.read.reader.as_ref().is_some_and(|(first, _)| {
                self.segments
                    .iter()
                    .any(|s| s.first_id == *first && s.first_id <= id && id < s.end_id())
            });
            if !valid {
                let Some(seg) = self.segments.iter().find(|s| id < s.end_id()) else {
                    self.read.id = self.next_id;
                    break;
                };
                if self.read.id < seg.first_id {
                    self.read.id = seg.first_id;
                }
                let mut r = BufReader::new(File::open(&seg.path).map_err(io_err(&seg.path))?);
                // Skip to the record with our id.
                for _ in seg.first_id..self.read.id {
                    let mut h = [0u8; HEADER];
                    r.read_exact(&mut h).map_err(io_err(&seg.path))?;
                    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as i64;
                    r.seek_relative(len).map_err(io_err(&seg.path))?;
                }
                self.read.reader = Some((seg.first_id, r));
            }
            let reader = &mut self.read.reader.as_mut().expect("set above").1;
            let path = dir.clone();
            match read_record(reader) {
                Ok(Some(rec)) if rec.id == self.read.id => {
                    self.read.id += 1;
                    out.push(rec);
                }
                Ok(other) => {
                    // Cannot happen for records this process wrote and flushed; the file was changed under us.
                    tracing::error!(spool = %path.display(), id = self.read.id, found = ?other.map(|r| r.id), "Spool record unreadable; skipping the rest of its segment.");
                    let seg_end = self
                        .segments
                        .iter()
                        .find(|s| self.read.id < s.end_id())
                        .map_or(self.next_id, |s| s.end_id());
                    self.dropped += seg_end - self.read.id;
                    self.read.id = seg_end;
                    self.read.reader = None;
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(out)
    }

    /// Moves the read cursor back to the oldest unacknowledged record (after a reconnect).
    pub fn rewind(&mut self) {
        self.read.id = self.acked;
        self.read.reader = None;
    }

    /// Moves the read cursor to `id` (must be between the acknowledged cursor and the end).
    pub fn seek(&mut self, id: u64) {
        self.read.id = id.clamp(self.acked, self.next_id);
        self.read.reader = None;
    }

    /// Where the read cursor is.
    pub fn read_id(&self) -> u64 {
        self.read.id
    }

    /// Records that every id below `upto` was delivered and deletes segments that are fully delivered. The cursor
    /// reaches the disk with [`Spool::persist_ack_if_due`] (call it from a timer) or [`Spool::persist_ack`].
    pub fn ack(&mut self, upto: u64) -> Result<(), SpoolError> {
        if upto <= self.acked {
            return Ok(());
        }
        self.acked = upto.min(self.next_id);
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.end_id() <= self.acked)
        {
            let seg = self.segments.pop_front().expect("checked");
            self.total_bytes -= seg.bytes;
            let _ = fs::remove_file(&seg.path);
        }
        Ok(())
    }

    /// Writes the cursor if it moved and the last write is [`ACK_PERSIST_INTERVAL`] ago.
    pub fn persist_ack_if_due(&mut self) -> Result<(), SpoolError> {
        if self.acked != self.acked_on_disk && self.last_ack_write.elapsed() >= ACK_PERSIST_INTERVAL
        {
            self.persist_ack()?;
        }
        Ok(())
    }

    /// Writes the acknowledgement cursor now (on disconnect and shutdown).
    pub fn persist_ack(&mut self) -> Result<(), SpoolError> {
        self.last_ack_write = Instant::now();
        if self.acked == self.acked_on_disk {
            return Ok(());
        }
        let tmp = self.dir.join("acked.tmp");
        fs::write(&tmp, format!("{}\n", self.acked)).map_err(io_err(&tmp))?;
        let path = self.dir.join("acked");
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.acked_on_disk = self.acked;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.sync();
        let _ = self.persist_ack();
    }
}

#[cfg(test)]
impl Spool {
    /// What SIGKILL leaves: buffered appends and the unwritten cursor are lost, the lock is released.
    fn crash(mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.into_parts();
        }
        self.unflushed = false;
        self.unsynced = false;
        self.acked = self.acked_on_disk;
        drop(self);
    }
}

/// Counts the valid records of a segment and cuts off a torn or corrupt tail.
fn scan_segment(path: &Path, first_id: u64) -> Result<(u64, u64), SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut r = BufReader::new(&file);
    let (mut records, mut good) = (0u64, 0u64);
    loop {
        match read_record(&mut r) {
            Ok(Some(rec)) if rec.id == first_id + records => {
                records += 1;
                good += (HEADER + 10 + rec.topic.len() + rec.payload.len()) as u64;
            }
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => {
                break;
            }
        }
    }
    if good < len {
        tracing::warn!(
            segment = %path.display(),
            kept = records,
            cut_bytes = len - good,
            "Spool segment ended in a torn or corrupt record (the daemon stopped mid-write); cutting it off."
        );
        file.set_len(good).map_err(io_err(path))?;
    }
    Ok((records, good))
}

/// Reads one record; `Ok(None)` at a clean end of file; `InvalidData`/`UnexpectedEof` for a torn or corrupt one.
fn read_record(r: &mut impl Read) -> io::Result<Option<Record>> {
    let mut h = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut h[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(h[4..].try_into().expect("4 bytes"));
    if !(10..=MAX_RECORD).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad record length",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if crc32(&body) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad record checksum",
        ));
    }
    let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    let tlen = u16::from_le_bytes(body[8..10].try_into().expect("2 bytes")) as usize;
    if 10 + tlen > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad topic length",
        ));
    }
    let topic = String::from_utf8_lossy(&body[10..10 + tlen]).into_owned();
    let payload = body[10 + tlen..].to_vec();
    Ok(Some(Record { id, topic, payload }))
}

/// CRC-32 (IEEE), table driven; the table is built at compile time.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, max: u64) -> Spool {
        Spool::open(dir, max, Duration::from_millis(1000)).unwrap()
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "x".repeat(100)).into_bytes()
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn reads_back_in_order_and_acks_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), 1 << 20);
        for i in 0..100 {
            assert_eq!(s.append("t/a", &payload(i)).unwrap(), i);
        }
        s.flush().unwrap();
        let got = s.read_next(30).unwrap();
        assert_eq!(
            got.iter().map(|r| r.id).collect::<Vec<_>>(),
            (0..30).collect::<Vec<_>>()
        );
        assert_eq!(got[5].payload, payload(5));
        assert_eq!(got[5].topic, "t/a");
        // More appends while reading; the reader follows the writer.
        for i in 100..150 {
            s.append("t/a", &payload(i)).unwrap();
        }
        let rest = s.read_next(1000).unwrap();
        assert_eq!(rest.first().unwrap().id, 30);
        assert_eq!(rest.last().unwrap().id, 149);
        assert!(s.read_next(10).unwrap().is_empty());
        s.ack(120).unwrap();
        assert_eq!(s.pending(), 30);
        // After a reconnect everything unacknowledged comes again, in order.
        s.rewind();
        let again = s.read_next(1000).unwrap();
        assert_eq!(
            again.iter().map(|r| r.id).collect::<Vec<_>>(),
            (120..150).collect::<Vec<_>>()
        );
        s.seek(140);
        assert_eq!(s.read_next(1).unwrap()[0].id, 140);
    }

    #[test]
    fn survives_reopen_and_keeps_only_unacked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path(), 64 << 10);
            for i in 0..500 {
                s.append("t", &payload(i)).unwrap();
            }
            s.flush().unwrap();
            s.ack(321).unwrap();
            s.persist_ack().unwrap();
            s.ack(400).unwrap(); // not persisted: a crash forgets it and 321..400 are sent again
            s.crash();
        }
        let mut s = open(dir.path(), 64 << 10);
        // The persisted cursor said 321; segments wholly below 400 were already deleted (delivered), so the
        // resumed cursor is the first record still on disk: between the two, never beyond the last real ack.
        let start = s.acked();
        assert!((321..=400).contains(&start), "{start}");
        assert_eq!(s.next_id(), 500);
        let got = s.read_next(1000).unwrap();
        assert_eq!(
            got.iter().map(|r| r.id).collect::<Vec<_>>(),
            (start..500).collect::<Vec<_>>()
        );
        assert_eq!(got[0].payload, payload(start));
        // New ids continue after the old ones.
        assert_eq!(s.append("t", b"new").unwrap(), 500);
    }

    #[test]
    fn torn_last_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path(), 1 << 20);
            for i in 0..10 {
                s.append("t", &payload(i)).unwrap();
            }
            s.flush().unwrap();
            s.crash();
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .unwrap();
        // Half a record at the end, as a crash in the middle of write(2) leaves it.
        let len = fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 40).unwrap();
        drop(f);
        let mut s = open(dir.path(), 1 << 20);
        assert_eq!(s.next_id(), 9);
        let got = s.read_next(100).unwrap();
        assert_eq!(got.len(), 9);
        assert_eq!(got[8].payload, payload(8));
        // A corrupt byte inside the last record is caught by the checksum too.
        drop(s);
        let mut bytes = fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let mut s = open(dir.path(), 1 << 20);
        assert_eq!(s.read_next(100).unwrap().len(), 8);
        assert_eq!(s.append("t", b"after").unwrap(), 8);
        s.flush().unwrap();
        drop(s);
        let mut s = open(dir.path(), 1 << 20);
        let got = s.read_next(100).unwrap();
        assert_eq!(got.len(), 9);
        assert_eq!(got[8].payload, b"after");
    }

    #[test]
    fn bound_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 10;
        let mut s = open(dir.path(), max);
        let n = 3000u64;
        for i in 0..n {
            s.append("t", &payload(i)).unwrap();
            assert!(s.bytes() <= max, "{} > {max}", s.bytes());
        }
        s.flush().unwrap();
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, s.bytes());
        let dropped = s.take_dropped();
        let kept = s.read_next(n as usize).unwrap();
        // The newest survive, contiguous up to the last; the oldest went, and every one of them was counted.
        assert_eq!(kept.last().unwrap().id, n - 1);
        assert!(kept.windows(2).all(|w| w[1].id == w[0].id + 1));
        assert_eq!(dropped + kept.len() as u64, n);
        assert!(dropped > n / 2, "dropped {dropped}");
        assert_eq!(s.take_dropped(), 0);
    }

    /// Records already read (in flight) when their segment goes are not counted: they may still be acknowledged,
    /// and the publisher settles them. Only the never-read ones are.
    #[test]
    fn bound_counts_only_unread_records() {
        let dir = tempfile::tempdir().unwrap();
        let max = 64 << 10;
        let mut s = open(dir.path(), max);
        let mut n = 0u64;
        while s.bytes() + 2 * payload(n).len() as u64 <= max {
            s.append("t", &payload(n)).unwrap();
            n += 1;
        }
        s.flush().unwrap();
        // Everything is in flight, nothing acknowledged; then the spool overflows twice over.
        assert_eq!(s.read_next(n as usize).unwrap().len() as u64, n);
        let more = 2 * n;
        for i in n..n + more {
            s.append("t", &payload(i)).unwrap();
        }
        s.flush().unwrap();
        let dropped = s.take_dropped();
        let left = s.read_next(usize::MAX).unwrap();
        let first_left = left.first().unwrap().id;
        // Of the ids below the first kept one, the first n were in flight: not counted. The rest never left.
        assert!(
            first_left > n,
            "the overflow reached the unread records: {first_left}"
        );
        assert_eq!(dropped, first_left - n);
        assert_eq!(s.acked(), first_left);
    }

    #[test]
    fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = open(dir.path(), 1 << 20);
        assert!(matches!(
            Spool::open(dir.path(), 1 << 20, Duration::ZERO),
            Err(SpoolError::Locked(_))
        ));
    }
}
