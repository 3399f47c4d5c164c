//! Ack mode over a real socket: `REGISTER:CONSUMER:<id>:ACK`, `ACK:<id>`,
//! redelivery when a connection closes or the ack wait passes, the bound
//! on messages in flight, the ack floor saved across restarts, and ids
//! keeping the mode they were created in.

use crate::util::*;

fn three_messages(broker: &Broker) {
    let mut p = broker.producer();
    for (n, text) in ["a", "b", "c"].iter().enumerate() {
        p.expect(&format!("SEND:{text}"), &format!("OK:MSG_ID:{}", n + 1));
    }
}

fn ack_consumer(broker: &Broker, id: &str) -> Client {
    let mut c = broker.connect();
    c.send(&format!("REGISTER:CONSUMER:{id}:ACK"));
    assert_eq!(c.line(), format!("OK:CONSUMER:{id}"));
    c
}

#[test]
fn acks_answer_ok_once_and_unknown_ids_are_refused() {
    let dir = TestDir::new("ack-basic");
    let broker = Broker::start(&dir, &[]);
    three_messages(&broker);
    let mut c = ack_consumer(&broker, "k");
    c.expect("GET", "MSG:1:a");
    c.expect("ACK:1", "OK:ACK:1");
    c.expect("ACK:1", "ERROR:Unknown message id");
    c.expect("ACK:2", "ERROR:Unknown message id"); // not delivered yet
    c.expect("ACK:99", "ERROR:Unknown message id");
    c.expect("ACK:two", "ERROR:Unknown message id");
    c.expect("ACK:", "ERROR:Unknown message id");
    // Pipelined GETs and ACKs, answered in order.
    c.send_bytes(b"GET\nGET\nGET\nACK:3\nACK:2\n");
    assert_eq!(c.reply(), "MSG:2:b");
    assert_eq!(c.reply(), "MSG:3:c");
    assert_eq!(c.reply(), "ERROR:No messages available");
    assert_eq!(c.reply(), "OK:ACK:3");
    assert_eq!(c.reply(), "OK:ACK:2");
    c.send("STATS");
    let stats = c.reply();
    assert_eq!(stat_value(&stats, "in_flight"), 0);
    assert_eq!(stat_value(&stats, "acked"), 3);
    // Everything acked: the queue released the messages.
    assert_eq!(stat_value(&stats, "messages"), 0);
}

#[test]
fn a_closed_connection_s_messages_go_at_once_to_another_connection_of_the_id() {
    let dir = TestDir::new("ack-close");
    let broker = Broker::start(&dir, &[]);
    three_messages(&broker);
    let mut first = ack_consumer(&broker, "w");
    assert_eq!(first.line(), "NOTIFY:MESSAGES_AVAILABLE:3");
    let mut second = ack_consumer(&broker, "w");
    assert_eq!(second.line(), "NOTIFY:MESSAGES_AVAILABLE:3");
    first.expect("GET", "MSG:1:a");
    first.expect("GET", "MSG:2:b");
    second.expect("GET", "MSG:3:c");
    second.expect("GET", "ERROR:No messages available");
    // "second" is armed now; "first" dies with 1 and 2 in flight.
    drop(first);
    assert_eq!(second.line(), "NOTIFY:MESSAGES_AVAILABLE:2");
    second.expect("GET", "MSG:1:a");
    second.expect("GET", "MSG:2:b");
    second.send("STATS");
    assert_eq!(stat_value(&second.reply(), "redelivered"), 2);
}

#[test]
fn without_an_ack_a_message_goes_again_after_the_ack_wait() {
    let dir = TestDir::new("ack-wait");
    let broker = Broker::start(&dir, &["--ack-wait", "1"]);
    three_messages(&broker);
    let mut c = ack_consumer(&broker, "slow");
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:3");
    c.expect("GET", "MSG:1:a");
    c.expect("ACK:1", "OK:ACK:1");
    c.expect("GET", "MSG:2:b");
    // No ack for 2: after the ack wait it is delivered again (and 3 first
    // or after, but 2 must come back).
    let mut seen = Vec::new();
    eventually("message 2 again", || {
        c.send("GET");
        let reply = c.reply();
        if reply != "ERROR:No messages available" {
            seen.push(reply.clone());
        }
        reply == "MSG:2:b"
    });
    // An ack that comes late still counts once.
    c.expect("ACK:2", "OK:ACK:2");
    c.expect("ACK:2", "ERROR:Unknown message id");
    assert!(
        seen.iter().all(|r| r == "MSG:3:c" || r == "MSG:2:b"),
        "{seen:?}"
    );
}

#[test]
fn in_flight_messages_per_id_are_bounded() {
    let dir = TestDir::new("ack-pending");
    let broker = Broker::start(&dir, &["--max-ack-pending", "2"]);
    three_messages(&broker);
    let mut c = ack_consumer(&broker, "b");
    c.send_bytes(b"GET\nGET\nGET\n");
    assert_eq!(c.reply(), "MSG:1:a");
    assert_eq!(c.reply(), "MSG:2:b");
    assert_eq!(c.reply(), "ERROR:No messages available");
    c.expect("ACK:1", "OK:ACK:1");
    c.expect("GET", "MSG:3:c");
}

#[test]
fn unacked_messages_hold_the_queue_and_acks_make_room() {
    let dir = TestDir::new("ack-room");
    let broker = Broker::start(&dir, &["--capacity", "3", "--send-timeout", "100"]);
    let mut c = ack_consumer(&broker, "r");
    three_messages(&broker);
    let mut p = broker.producer();
    for _ in 0..3 {
        c.send("GET");
        assert!(c.reply().starts_with("MSG:"));
    }
    p.expect("SEND:d", "ERROR:Queue full");
    c.expect("ACK:2", "OK:ACK:2");
    p.expect("SEND:d", "ERROR:Queue full"); // 1 is still unacked: the floor stays
    c.expect("ACK:1", "OK:ACK:1");
    p.expect("SEND:d", "OK:MSG_ID:4");
}

#[test]
fn the_ack_floor_is_saved_and_a_restart_redelivers_what_was_in_flight() {
    let dir = TestDir::new("ack-restart");
    let mut broker = Broker::start(&dir, &[]);
    three_messages(&broker);
    let mut c = ack_consumer(&broker, "f");
    c.send_bytes(b"GET\nGET\nGET\nACK:1\nACK:3\n");
    for expected in ["MSG:1:a", "MSG:2:b", "MSG:3:c", "OK:ACK:1", "OK:ACK:3"] {
        assert_eq!(c.reply(), expected);
    }
    drop(c);
    assert!(broker.terminate().success());
    let offsets = std::fs::read_to_string(dir.join("messages.dat.offsets")).unwrap();
    assert!(
        offsets.lines().any(|l| l == "CONSUMER:f:1:ACK"),
        "{offsets}"
    );
    broker.restart();
    // The floor is 1: 2 and 3 come again (3 was acked above the floor, and
    // at least once allows delivering it twice).
    let mut c = ack_consumer(&broker, "f");
    c.expect("GET", "MSG:2:b");
    c.expect("GET", "MSG:3:c");
    c.expect("GET", "ERROR:No messages available");
    // The mode survived the restart too.
    let mut plain = broker.connect();
    plain.expect("REGISTER:CONSUMER:f", "ERROR:Invalid registration message");
}

#[test]
fn an_id_keeps_the_mode_it_was_created_in() {
    let dir = TestDir::new("ack-mixing");
    let broker = Broker::start(&dir, &[]);
    let _plain = broker.consumer("p");
    let mut c = broker.connect();
    c.expect(
        "REGISTER:CONSUMER:p:ACK",
        "ERROR:Invalid registration message",
    );
    // The refused registration left the connection unregistered.
    c.expect("GET", "ERROR:Not registered");
    let _acking = ack_consumer(&broker, "a");
    c.expect("REGISTER:CONSUMER:a", "ERROR:Invalid registration message");
    c.expect("REGISTER:CONSUMER:a:ACK", "OK:CONSUMER:a");
    // A plain consumer's ACK is always an unknown id.
    let mut p = broker.consumer("p");
    p.expect("ACK:1", "ERROR:Unknown message id");
}

#[test]
fn acks_that_make_room_notify_every_waiting_connection_of_the_id() {
    let dir = TestDir::new("ack-room-notify");
    let broker = Broker::start(&dir, &["--max-ack-pending", "1"]);
    three_messages(&broker);
    let mut b = ack_consumer(&broker, "m");
    assert_eq!(b.line(), "NOTIFY:MESSAGES_AVAILABLE:3");
    let mut a = ack_consumer(&broker, "m");
    assert_eq!(a.line(), "NOTIFY:MESSAGES_AVAILABLE:3");
    b.expect("GET", "MSG:1:a");
    // One in flight, the most allowed: A finds nothing and waits.
    a.send("GET");
    assert_eq!(a.line(), "ERROR:No messages available");
    b.send("ACK:1");
    assert_eq!(b.reply(), "OK:ACK:1");
    assert_eq!(a.line(), "NOTIFY:MESSAGES_AVAILABLE:2");
    a.expect("GET", "MSG:2:b");
}
