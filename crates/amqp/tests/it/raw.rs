//! A client that speaks AMQP frame by frame (amq-protocol's codec), to send what
//! well-behaved libraries never do and read exactly what the server answers.

use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Raw {
    pub socket: TcpStream,
    buf: Vec<u8>,
}

pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .expect("frame encodes")
        .into_inner()
        .0
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            socket: TcpStream::connect(addr).await.expect("connects"),
            buf: Vec::new(),
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("writes");
    }

    pub async fn send(&mut self, frame: AMQPFrame) {
        let bytes = encode(&frame);
        self.send_bytes(&bytes).await;
    }

    pub async fn method(&mut self, channel: u16, m: AMQPClass) {
        self.send(AMQPFrame::Method(channel, m)).await;
    }

    /// The next frame, or `None` once the server closed the socket.
    pub async fn recv(&mut self) -> Option<AMQPFrame> {
        loop {
            if !self.buf.is_empty() {
                if let Ok((rest, frame)) = parse_frame(&self.buf[..]) {
                    let used = self.buf.len() - rest.len();
                    self.buf.drain(..used);
                    return Some(frame);
                }
            }
            // Read straight into the heap buffer: a large array here would live
            // in every test's future.
            self.buf.reserve(64 * 1024);
            let n = tokio::time::timeout(WAIT, self.socket.read_buf(&mut self.buf))
                .await
                .expect("the server answers in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Raw bytes as they come (the protocol-header answer is not a frame).
    pub async fn recv_bytes(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        loop {
            out.reserve(1024);
            let n = tokio::time::timeout(WAIT, self.socket.read_buf(&mut out))
                .await
                .expect("the server answers in time")
                .unwrap_or(0);
            if n == 0 {
                return out;
            }
        }
    }

    /// The next method frame (heartbeats skipped).
    pub async fn recv_method(&mut self) -> Option<(u16, AMQPClass)> {
        loop {
            match self.recv().await? {
                AMQPFrame::Method(ch, m) => return Some((ch, m)),
                AMQPFrame::Heartbeat => continue,
                other => panic!("expected a method frame, got {other:?}"),
            }
        }
    }

    /// Protocol header, PLAIN guest/guest, tune with `frame_max`, open `/`.
    pub async fn open(addr: SocketAddr, frame_max: u32) -> Raw {
        Raw::open_with(addr, frame_max, 0).await
    }

    /// Protocol header and `connection.start`: ready for `start-ok`.
    pub async fn started(addr: SocketAddr) -> Raw {
        let mut c = Raw::connect(addr).await;
        c.send_bytes(b"AMQP\x00\x00\x09\x01").await;
        let Some((0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))) =
            c.recv_method().await
        else {
            panic!("expected connection.start");
        };
        c
    }

    /// `start-ok`, listing the `connection.blocked` capability as client
    /// libraries do.
    pub async fn start_ok(&mut self, mechanism: &str, response: &[u8]) {
        let mut capabilities = amq_protocol::types::FieldTable::default();
        capabilities.insert(
            "connection.blocked".into(),
            amq_protocol::types::AMQPValue::Boolean(true),
        );
        let mut client_properties = amq_protocol::types::FieldTable::default();
        client_properties.insert(
            "capabilities".into(),
            amq_protocol::types::AMQPValue::FieldTable(capabilities),
        );
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: mechanism.into(),
                response: response.to_vec().into(),
                locale: "en_US".into(),
            })),
        )
        .await;
    }

    /// A whole handshake with the heartbeat interval the client asks for.
    pub async fn open_with(addr: SocketAddr, frame_max: u32, heartbeat: u16) -> Raw {
        let mut c = Raw::started(addr).await;
        c.start_ok("PLAIN", b"\0guest\0guest").await;
        let Some((0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) =
            c.recv_method().await
        else {
            panic!("expected connection.tune");
        };
        c.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 0,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        c.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        let Some((0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))) =
            c.recv_method().await
        else {
            panic!("expected connection.open-ok");
        };
        c
    }

    pub async fn open_channel(&mut self, ch: u16) {
        self.method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        let Some((got, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))) =
            self.recv_method().await
        else {
            panic!("expected channel.open-ok");
        };
        assert_eq!(got, ch);
    }

    /// The server's `connection.close`: (reply code, text); the socket then ends.
    pub async fn expect_connection_close(&mut self) -> (u16, String) {
        loop {
            match self.recv_method().await {
                Some((0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                    self.method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )
                    .await;
                    return (c.reply_code, c.reply_text.to_string());
                }
                Some(_) => continue,
                None => panic!("the server closed the socket without connection.close"),
            }
        }
    }

    /// The server's `channel.close` on `ch`: (reply code, text).
    pub async fn expect_channel_close(&mut self, ch: u16) -> (u16, String) {
        loop {
            match self.recv_method().await {
                Some((got, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) if got == ch => {
                    self.method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                    .await;
                    return (c.reply_code, c.reply_text.to_string());
                }
                Some((_, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                    panic!(
                        "connection closed instead: {} {}",
                        c.reply_code, c.reply_text
                    )
                }
                Some(_) => continue,
                None => panic!("socket closed while waiting for channel.close"),
            }
        }
    }

    pub async fn publish_header(&mut self, ch: u16, routing_key: &str, body_size: u64) {
        self.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: routing_key.into(),
                mandatory: false,
                immediate: false,
            })),
        )
        .await;
        self.send(AMQPFrame::Header(
            ch,
            AMQPContentHeader {
                class_id: 60,
                body_size,
                properties: Default::default(),
            },
        ))
        .await;
    }
}

/// `queue.declare` of a durable queue named `name`, defaults otherwise.
pub fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(amq_protocol::protocol::queue::AMQPMethod::Declare(
        amq_protocol::protocol::queue::Declare {
            queue: name.into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: Default::default(),
        },
    ))
}
