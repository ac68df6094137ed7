//! Reads the HTTP/1.1 request vectors of nodejs/llhttp (../shared/testdata/http/llhttp)
//! as that project's runner does: each case is a heading, a `meta` comment, an `http`
//! block (decoded: final newline dropped, backslash-newline removed, newlines turned
//! into CRLF, then \r \n \t \f \xHH and octal escapes expanded) and a `log` block whose
//! `error` lines say the parser must reject it.

use std::path::Path;

#[derive(Debug, Clone)]
pub struct Case {
    pub file: String,
    pub title: String,
    pub meta: String,
    pub raw: Vec<u8>,
    /// The strict parser rejects this input.
    pub expects_error: bool,
}

impl Case {
    pub fn lenient(&self) -> bool {
        self.meta.contains("lenient")
    }

    pub fn is_request(&self) -> bool {
        self.meta.contains("\"type\": \"request\"") || self.meta.contains("\"type\":\"request\"")
    }
}

pub fn shared_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/http/llhttp/request")
}

/// Every case of one file; cases using `${...}` JavaScript expressions are skipped.
pub fn cases(file: &str) -> Vec<Case> {
    let path = shared_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut title = String::new();
    let mut meta = String::new();
    let mut lines = text.lines().peekable();
    let mut pending: Option<Case> = None;
    while let Some(line) = lines.next() {
        if let Some(t) = line.strip_prefix('#') {
            title = t.trim_start_matches('#').trim().to_string();
        } else if let Some(m) = line.strip_prefix("<!-- meta=") {
            meta = m.trim_end_matches("-->").trim().to_string();
        } else if line.trim() == "```http" {
            let mut block = Vec::new();
            for l in lines.by_ref() {
                if l.trim_end() == "```" {
                    break;
                }
                block.push(l);
            }
            let body = block.join("\n");
            if body.contains("${") {
                continue;
            }
            pending = Some(Case {
                file: file.to_string(),
                title: title.clone(),
                meta: meta.clone(),
                raw: decode(&body),
                expects_error: false,
            });
        } else if line.trim() == "```log" {
            let mut error = false;
            for l in lines.by_ref() {
                if l.trim_end() == "```" {
                    break;
                }
                error |= l.split_whitespace().nth(1) == Some("error");
            }
            if let Some(mut c) = pending.take() {
                c.expects_error = error;
                out.push(c);
            }
        }
    }
    out
}

fn decode(block: &str) -> Vec<u8> {
    let joined = block.replace("\\\n", "");
    let crlf = joined.replace('\n', "\r\n");
    let b = crlf.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let c = b[i + 1];
            match c {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'f' => out.push(0x0c),
                b'x' if i + 3 < b.len() + 1 => {
                    let hex = std::str::from_utf8(&b[i + 2..(i + 4).min(b.len())]).unwrap_or("");
                    if let Ok(v) = u8::from_str_radix(hex, 16) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                    out.push(c);
                }
                b'0'..=b'7' => {
                    let mut j = i + 1;
                    let mut v: u32 = 0;
                    while j < b.len() && j < i + 4 && (b'0'..=b'7').contains(&b[j]) {
                        v = v * 8 + u32::from(b[j] - b'0');
                        j += 1;
                    }
                    out.push(v as u8);
                    i = j;
                    continue;
                }
                other => out.push(other),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_the_llhttp_runner() {
        assert_eq!(decode("GET / HTTP/1.1\nA: \\x41\\t\\101\n"), b"GET / HTTP/1.1\r\nA: A\tA\r\n".to_vec());
        assert_eq!(decode("a\\\nb"), b"ab".to_vec());
    }

    #[test]
    fn reads_the_shared_vectors() {
        let cs = cases("content-length.md");
        assert!(cs.iter().any(|c| c.title.contains("duplicate") && c.expects_error));
        assert!(cs.iter().any(|c| !c.expects_error));
    }
}
