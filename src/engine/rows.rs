//! The rows a plan will write, held in memory up to a limit and past it in
//! an unnamed temporary file, so that a pass which must insert or repair
//! most of a large table (a first load, a renamed field) does not hold
//! them all: memory stays bounded whatever the drift.
//!
//! The file is created with `O_TMPFILE` where the system has it (else
//! created and unlinked at once): it has no name, and the kernel frees it
//! when driftd exits, killed or not. Rows read back in the order they were
//! pushed, those in memory first.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use crate::model::{Key, Row, Value};

/// Rows kept in memory before the rest go to the file: about 30 MB of
/// Wazo-shaped users.
pub const IN_MEMORY: usize = 65_536;

/// Rows of one kind (inserts or updates) in push order.
#[derive(Debug)]
pub struct Rows {
    mem: Vec<Row>,
    file: Option<BufWriter<File>>,
    /// Rows in the file.
    spilled: usize,
    limit: usize,
    /// The first write to the file that failed: the rows are incomplete,
    /// and reading them back says so.
    failed: Option<String>,
}

impl Default for Rows {
    fn default() -> Self {
        Self::with_limit(IN_MEMORY)
    }
}

#[cfg(test)]
impl PartialEq<Vec<Row>> for Rows {
    /// Equal when every row is in memory and they are `other`'s (for
    /// tests).
    fn eq(&self, other: &Vec<Row>) -> bool {
        self.spilled == 0 && self.failed.is_none() && &self.mem == other
    }
}

#[cfg(test)]
impl FromIterator<Row> for Rows {
    fn from_iter<I: IntoIterator<Item = Row>>(rows: I) -> Self {
        let mut all = Rows::default();
        for row in rows {
            all.push(row);
        }
        all
    }
}

impl Rows {
    /// Rows that keep `limit` in memory.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            mem: Vec::new(),
            file: None,
            spilled: 0,
            limit,
            failed: None,
        }
    }

    pub fn push(&mut self, row: Row) {
        if self.failed.is_some() {
            return;
        }
        if self.mem.len() < self.limit {
            self.mem.push(row);
            return;
        }
        if let Err(e) = self.spill(&row) {
            self.failed = Some(format!(
                "cannot write the rows to apply to a temporary file: {e}"
            ));
        }
    }

    fn spill(&mut self, row: &Row) -> io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self
                .file
                .insert(BufWriter::with_capacity(1 << 16, tempfile::tempfile()?)),
        };
        encode(file, row)?;
        self.spilled += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.mem.len() + self.spilled
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        *self = Self::with_limit(self.limit);
    }

    /// Whether some rows are in the file.
    #[cfg(test)]
    pub fn spilled(&self) -> bool {
        self.spilled > 0
    }

    /// The first `n` rows' keys.
    pub fn keys(&mut self, n: usize) -> Result<Vec<String>, String> {
        let mut keys = Vec::with_capacity(n.min(self.len()));
        let mut reader = self.reader()?;
        while keys.len() < n {
            let Some(batch) = reader.next_batch(4096.min(n - keys.len()))? else {
                break;
            };
            keys.extend(batch.iter().map(|r| r.key.to_string()));
        }
        Ok(keys)
    }

    /// Every row, read back.
    #[cfg(test)]
    pub fn to_vec(&mut self) -> Result<Vec<Row>, String> {
        let mut all = Vec::with_capacity(self.len());
        let mut reader = self.reader()?;
        while let Some(batch) = reader.next_batch(4096)? {
            all.extend(batch.iter().cloned());
        }
        Ok(all)
    }

    /// Reads the rows back from the first, in batches.
    pub fn reader(&mut self) -> Result<Reader<'_>, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let file = match self.file.as_mut() {
            None => None,
            Some(w) => {
                let ready = w
                    .flush()
                    .and_then(|()| w.get_mut().seek(SeekFrom::Start(0)));
                ready.map_err(|e| format!("cannot read back the rows to apply: {e}"))?;
                Some(BufReader::with_capacity(1 << 16, w.get_ref()))
            }
        };
        Ok(Reader {
            mem: &self.mem,
            at: 0,
            file,
            left: self.spilled,
        })
    }
}

/// Reads [`Rows`] back, a batch at a time.
pub struct Reader<'a> {
    mem: &'a [Row],
    at: usize,
    file: Option<BufReader<&'a File>>,
    /// Rows still in the file.
    left: usize,
}

impl Reader<'_> {
    /// The next at most `n` rows, `None` after the last. A batch is all
    /// from memory or all from the file.
    pub fn next_batch(&mut self, n: usize) -> Result<Option<Cow<'_, [Row]>>, String> {
        let n = n.max(1);
        if self.at < self.mem.len() {
            let end = (self.at + n).min(self.mem.len());
            let batch = &self.mem[self.at..end];
            self.at = end;
            return Ok(Some(Cow::Borrowed(batch)));
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        if self.left == 0 {
            return Ok(None);
        }
        let take = n.min(self.left);
        let mut rows = Vec::with_capacity(take);
        for _ in 0..take {
            rows.push(
                decode(file).map_err(|e| format!("cannot read back the rows to apply: {e}"))?,
            );
        }
        self.left -= take;
        Ok(Some(Cow::Owned(rows)))
    }
}

fn put_len(w: &mut impl Write, n: usize) -> io::Result<()> {
    let n = u32::try_from(n).map_err(|_| io::Error::other("a value longer than 4 GiB"))?;
    w.write_all(&n.to_le_bytes())
}

fn encode(w: &mut impl Write, row: &Row) -> io::Result<()> {
    put_len(w, row.key.as_str().len())?;
    w.write_all(row.key.as_str().as_bytes())?;
    put_len(w, row.values.len())?;
    for v in &row.values {
        match v {
            Value::Null => w.write_all(&[0])?,
            Value::Bool(false) => w.write_all(&[1])?,
            Value::Bool(true) => w.write_all(&[2])?,
            Value::Int(i) => {
                w.write_all(&[3])?;
                w.write_all(&i.to_le_bytes())?;
            }
            Value::Text(t) => {
                w.write_all(&[4])?;
                put_len(w, t.len())?;
                w.write_all(t.as_bytes())?;
            }
        }
    }
    Ok(())
}

fn get_len(r: &mut impl Read) -> io::Result<usize> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b) as usize)
}

fn get_text(r: &mut impl Read) -> io::Result<String> {
    let mut b = vec![0u8; get_len(r)?];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| io::Error::other("text that is not UTF-8"))
}

fn decode(r: &mut impl Read) -> io::Result<Row> {
    let key = Key(get_text(r)?.into());
    let n = get_len(r)?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        values.push(match tag[0] {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => {
                let mut b = [0u8; 8];
                r.read_exact(&mut b)?;
                Value::Int(i64::from_le_bytes(b))
            }
            4 => Value::Text(get_text(r)?),
            t => return Err(io::Error::other(format!("unknown value tag {t}"))),
        });
    }
    Ok(Row { key, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                key: Key(format!("k{i}").into()),
                values: vec![
                    Value::Null,
                    Value::Bool(i % 2 == 0),
                    Value::Int(i as i64 - 3),
                    Value::Text(format!("é{i};\0x").repeat(i % 3)),
                ],
            })
            .collect()
    }

    fn read_all(r: &mut Rows, batch: usize) -> Vec<Row> {
        let mut got = Vec::new();
        let mut reader = r.reader().unwrap();
        while let Some(b) = reader.next_batch(batch).unwrap() {
            assert!(b.len() <= batch.max(1));
            got.extend(b.iter().cloned());
        }
        got
    }

    /// Past its limit the rows go to the file and come back whole and in
    /// order, in batches of any size, as often as they are read.
    #[test]
    fn rows_past_the_limit_come_back_in_order() {
        for (limit, n, batch) in [(0, 5, 2), (3, 10, 4), (10, 10, 3), (4, 9, 1), (2, 7, 100)] {
            let mut r = Rows::with_limit(limit);
            let want = rows(n);
            for row in want.clone() {
                r.push(row);
            }
            assert_eq!(r.len(), n);
            assert_eq!(r.spilled(), n > limit);
            assert_eq!(read_all(&mut r, batch), want, "limit {limit} n {n}");
            assert_eq!(read_all(&mut r, batch + 1), want, "read twice");
            assert_eq!(
                r.keys(n - 1).unwrap(),
                want[..n - 1]
                    .iter()
                    .map(|r| r.key.to_string())
                    .collect::<Vec<_>>()
            );
            r.clear();
            assert!(r.is_empty() && !r.spilled());
            assert!(read_all(&mut r, batch).is_empty());
        }
    }

    /// Comparing (in tests) sees only rows that are all in memory.
    #[test]
    fn only_rows_in_memory_compare_equal() {
        let mut r = Rows::with_limit(1);
        for row in rows(3) {
            r.push(row);
        }
        assert!(r != rows(3), "spilled rows are not compared");
        let mut small = Rows::with_limit(5);
        for row in rows(3) {
            small.push(row);
        }
        assert!(small == rows(3));
    }
}
