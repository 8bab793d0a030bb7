//! Where a request message that hyper's HTTP/1.1 server reads ends, told
//! from its head and then from its bytes as they are handed to hyper, so
//! that a request pipelined behind it is judged before hyper sees it
//! ([`crate::handover`]). Chunked bodies are followed as hyper's decoder
//! reads them; what it would refuse ends the following (hyper then closes
//! the connection), and so does a message whose end cannot be told (a head
//! hyper refuses). An upgrade ends as any request does: what follows it is a
//! next request when the upgrade is declined, and the tunnel's when it is
//! not ([`crate::handover`] tells the two apart).

/// The most header fields hyper's server reads in a head.
const MAX_HEADERS: usize = 100;

/// How far the message being handed to hyper goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageEnd {
    /// This many more bytes (head and `Content-Length` body) belong to it.
    After(u64),
    /// The head is given; a chunked body follows.
    Chunked(Chunk),
    /// It ended: what follows is a next head, to be judged.
    Reached,
    /// Everything that follows is hyper's (or the tunnel's).
    Unknown,
    /// A line of the chunked trailer section ended with a bare LF. hyper
    /// would read on into the trailers (a next request too), where a
    /// reader that takes LF for a line's end sees the message end: the
    /// connection is not to go on.
    Ambiguous,
}

impl MessageEnd {
    /// The end of the message whose complete head starts `head`.
    pub fn of_head(head: &[u8]) -> MessageEnd {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let Ok(httparse::Status::Complete(len)) = req.parse(head) else { return MessageEnd::Unknown };
        if req.method == Some("CONNECT") || req.version != Some(1) && req.version != Some(0) {
            return MessageEnd::Unknown;
        }
        let (mut length, mut coded, mut chunked) = (None, false, false);
        for f in req.headers.iter() {
            let name = f.name.as_bytes();
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // As hyper reads it: the last field decides, chunked when its last coding is.
                let last = f.value.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii);
                (coded, chunked) = (true, last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                for part in f.value.split(|&b| b == b',') {
                    match digits(part.trim_ascii()) {
                        Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                        _ => return MessageEnd::Unknown,
                    }
                }
            }
        }
        let len = len as u64;
        match (coded, chunked, length) {
            // hyper refuses a coding it cannot undo (and closes).
            (true, false, _) => MessageEnd::Unknown,
            // Both: hyper reads it chunked (cutover's judge answers it first).
            (true, true, _) => MessageEnd::After(len).then_chunked(),
            (false, _, Some(n)) => len.checked_add(n).map_or(MessageEnd::Unknown, MessageEnd::After),
            (false, _, None) => MessageEnd::After(len),
        }
    }

    fn then_chunked(self) -> MessageEnd {
        match self {
            MessageEnd::After(head) => MessageEnd::Chunked(Chunk { head, state: State::Start, size: 0 }),
            other => other,
        }
    }

    /// Follows `bytes`, the next ones handed to hyper: how many of them belong
    /// to the message when it ends within them.
    pub fn follow(&mut self, bytes: &[u8]) -> Option<usize> {
        match self {
            MessageEnd::After(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(bytes.len());
                *left -= n as u64;
                (*left == 0).then(|| {
                    *self = MessageEnd::Reached;
                    n
                })
            }
            MessageEnd::Chunked(c) => match c.follow(bytes) {
                Followed::Within => None,
                Followed::Ended(n) => {
                    *self = MessageEnd::Reached;
                    Some(n)
                }
                Followed::Lost => {
                    *self = MessageEnd::Unknown;
                    None
                }
                Followed::Ambiguous => {
                    *self = MessageEnd::Ambiguous;
                    None
                }
            },
            MessageEnd::Reached => Some(0),
            MessageEnd::Unknown | MessageEnd::Ambiguous => None,
        }
    }
}

/// A decimal length as hyper reads one: digits only, any number of them
/// (leading zeros too), within `u64`.
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// A chunked body's decoding, byte by byte as hyper's decoder goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Head bytes still to be given before the body starts.
    head: u64,
    state: State,
    /// The chunk size read so far, then what is left of the chunk's data.
    size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

enum Followed {
    /// The body goes on past these bytes.
    Within,
    /// It ended after this many of them.
    Ended(usize),
    /// hyper refuses what came: its end cannot be told.
    Lost,
    /// A trailer line ended with a bare LF ([`MessageEnd::Ambiguous`]).
    Ambiguous,
}

impl Chunk {
    fn follow(&mut self, bytes: &[u8]) -> Followed {
        let mut i = usize::try_from(self.head).unwrap_or(usize::MAX).min(bytes.len());
        self.head -= i as u64;
        while i < bytes.len() {
            if self.state == State::Data {
                let n = usize::try_from(self.size).unwrap_or(usize::MAX).min(bytes.len() - i);
                self.size -= n as u64;
                i += n;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            if b == b'\n' && matches!(self.state, State::Trailer | State::EndCr) {
                return Followed::Ambiguous;
            }
            match self.step(b) {
                Some(Some(next)) => self.state = next,
                Some(None) => return Followed::Ended(i),
                None => return Followed::Lost,
            }
        }
        Followed::Within
    }

    /// The state after byte `b`: `Some(None)` at the body's end, `None` for
    /// a byte hyper refuses.
    fn step(&mut self, b: u8) -> Option<Option<State>> {
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        let next = match (self.state, b) {
            (State::Start, _) => {
                self.size = hex(b)?;
                State::Size
            }
            (State::Size, _) if hex(b).is_some() => {
                self.size = self.size.checked_mul(16)?.checked_add(hex(b)?)?;
                State::Size
            }
            (State::Size | State::SizeLws, b'\t' | b' ') => State::SizeLws,
            (State::Size | State::SizeLws, b';') => State::Extension,
            (State::Size | State::SizeLws | State::Extension, b'\r') => State::SizeLf,
            (State::Extension, b'\n') => return None,
            (State::Extension, _) => State::Extension,
            (State::SizeLf, b'\n') if self.size == 0 => State::EndCr,
            (State::SizeLf, b'\n') => State::Data,
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Start,
            (State::Trailer, b'\r') => State::TrailerLf,
            (State::Trailer, _) => State::Trailer,
            (State::TrailerLf, b'\n') => State::EndCr,
            (State::EndCr, b'\r') => State::EndLf,
            (State::EndCr, _) => State::Trailer,
            (State::EndLf, b'\n') => return Some(None),
            _ => return None,
        };
        Some(Some(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Follows `message` then `after`, given to hyper in pieces of `step`
    /// bytes: the bytes of the message, when its end was found.
    fn end_of(message: &[u8], after: &[u8], step: usize) -> Option<usize> {
        let all = [message, after].concat();
        let head_end = all.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let mut end = MessageEnd::of_head(&all[..head_end]);
        let mut given = 0;
        for piece in all.chunks(step) {
            if let Some(n) = end.follow(piece) {
                return Some(given + n);
            }
            given += piece.len();
        }
        None
    }

    #[test]
    fn a_length_or_no_body_ends_where_it_says() {
        let m = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        for step in [1, 3, 100] {
            assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", step), Some(m.len()), "step {step}");
        }
        let m = b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", 7), Some(m.len()));
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let m: &[u8] = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1 \r\n!\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\n";
        for step in [1, 2, 5, 1000] {
            assert_eq!(end_of(m, b"POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\n", step), Some(m.len()), "step {step}");
        }
        let plain: &[u8] =
            b"POST /a HTTP/1.1\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(end_of(plain, b"GET / HTTP/1.1\r\n\r\n", 4), Some(plain.len()));
    }

    #[test]
    fn lengths_and_codings_are_read_as_hyper_reads_them() {
        let m = b"POST /a HTTP/1.1\r\nContent-Length: 0000000000000000000003\r\n\r\nabc";
        assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", 5), Some(m.len()));
        let m = b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", 5), Some(m.len()));
    }

    #[test]
    fn what_hyper_refuses_or_cannot_frame_is_not_followed() {
        for m in [
            &b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\nab",
        ] {
            assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", 3), None, "{}", String::from_utf8_lossy(m));
        }
    }

    /// A bare LF ending a trailer line (or the empty line after the last
    /// chunk) is where hyper and a lenient reader part ways.
    #[test]
    fn a_bare_lf_in_the_trailer_section_is_ambiguous() {
        let head = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for tail in [&b"0\r\n\n"[..], b"0\r\nA: b\n\r\n", b"0\r\nA: b\r\n\n", b"3\r\nabc\r\n0\r\n\n"] {
            let mut end = MessageEnd::of_head(head);
            assert_eq!(end.follow(&[&head[..], tail, b"GET / HTTP/1.1\r\n\r\n"].concat()), None);
            assert_eq!(end, MessageEnd::Ambiguous, "{}", String::from_utf8_lossy(tail));
        }
    }

    /// An upgrade request ends as any other (what follows is for the handover to tell apart).
    #[test]
    fn an_upgrade_request_ends_with_its_head_or_body() {
        let m = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", 3), Some(m.len()));
        let m = b"POST /up HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(end_of(m, b"GET / HTTP/1.1\r\n\r\n", 3), Some(m.len()));
    }
}
