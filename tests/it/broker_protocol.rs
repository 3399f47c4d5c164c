//! The wire protocol as PROTOCOL.md states it, over a real socket:
//! registration rules, every request and its exact reply, pipelining,
//! consumer ids and cursors (fan-out, competing consumers, where a new id
//! starts), and the NOTIFY rules.

use crate::util::*;

#[test]
fn a_whole_conversation_with_exact_replies() {
    let dir = TestDir::new("proto-conversation");
    let broker = Broker::start(&dir, &[]);
    let mut c = broker.connect();
    // Before registration: only REGISTER, AUTH, HEARTBEAT, STATS, QUIT.
    c.expect("SEND:x", "ERROR:Not registered");
    c.expect("GET", "ERROR:Not registered");
    c.expect("ACK:1", "ERROR:Not registered");
    c.expect("FROB", "ERROR:Unknown command");
    c.expect("HEARTBEAT:1700000000", "OK:HEARTBEAT");
    c.send("STATS");
    assert!(c.line().starts_with("OK:STATS:"));
    c.expect("REGISTER:NOBODY", "ERROR:Invalid registration message");
    c.expect(
        "REGISTER:CONSUMER:bad id",
        "ERROR:Invalid registration message",
    );
    c.expect(
        "REGISTER:CONSUMER:x:ACKS",
        "ERROR:Invalid registration message",
    );
    c.expect("REGISTER:PRODUCER", "OK:PRODUCER");
    c.expect("REGISTER:PRODUCER", "ERROR:Already registered");
    c.expect("REGISTER:CONSUMER:a", "ERROR:Already registered");
    c.expect("SEND:hello", "OK:MSG_ID:1");
    c.expect("SEND:a:b:c", "OK:MSG_ID:2");
    c.expect("SEND:", "ERROR:Empty message");
    c.expect("GET", "ERROR:Not allowed for this client type");
    c.expect("ACK:1", "ERROR:Not allowed for this client type");
    c.expect("HEARTBEAT:5", "OK:HEARTBEAT");
    c.expect("QUIT", "OK:BYE");
    assert!(c.is_closed());

    let mut k = broker.consumer("k1");
    assert_eq!(k.line(), "NOTIFY:MESSAGES_AVAILABLE:2");
    k.expect("SEND:x", "ERROR:Not allowed for this client type");
    k.expect("GET", "MSG:1:hello");
    k.expect("GET", "MSG:2:a:b:c");
    k.expect("GET", "ERROR:No messages available");
    k.expect("ACK:2", "ERROR:Unknown message id");
    k.expect("QUIT", "OK:BYE");
    assert!(k.is_closed());
}

#[test]
fn crlf_is_accepted_and_content_is_opaque_bytes() {
    let dir = TestDir::new("proto-bytes");
    let broker = Broker::start(&dir, &[]);
    let mut p = broker.producer();
    p.send_bytes(b"SEND:caf\xc3\xa9 \xff\x00 \"q\" a:b\r\n");
    assert_eq!(p.line(), "OK:MSG_ID:1");
    p.send_bytes(b"HEARTBEAT:1\r\n");
    assert_eq!(p.line(), "OK:HEARTBEAT");
    let mut c = broker.consumer("bytes");
    c.send("GET");
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:1");
    c.send("GET");
    assert_eq!(c.line_bytes(), b"MSG:1:caf\xc3\xa9 \xff\x00 \"q\" a:b");
}

#[test]
fn pipelined_requests_get_one_reply_each_in_order() {
    let dir = TestDir::new("proto-pipeline");
    let broker = Broker::start(&dir, &[]);
    let mut p = broker.connect();
    let mut batch = String::from("REGISTER:PRODUCER\n");
    for n in 1..=500 {
        batch.push_str(&format!("SEND:m{n}\n"));
        if n % 100 == 0 {
            batch.push_str("SEND:\nHEARTBEAT:1\n");
        }
    }
    batch.push_str("QUIT\n");
    p.send_bytes(batch.as_bytes());
    assert_eq!(p.line(), "OK:PRODUCER");
    let mut id = 0;
    for n in 1..=500 {
        id += 1;
        assert_eq!(p.line(), format!("OK:MSG_ID:{id}"), "message {n}");
        if n % 100 == 0 {
            assert_eq!(p.line(), "ERROR:Empty message");
            assert_eq!(p.line(), "OK:HEARTBEAT");
        }
    }
    assert_eq!(p.line(), "OK:BYE");

    let mut c = broker.consumer("pipe");
    c.send_bytes("GET\n".repeat(501).as_bytes());
    for n in 1..=500 {
        assert_eq!(c.reply(), format!("MSG:{n}:m{n}"));
    }
    assert_eq!(c.reply(), "ERROR:No messages available");
}

#[test]
fn assigned_ids_are_decimal_new_and_never_clash_with_chosen_ones() {
    let dir = TestDir::new("proto-ids");
    let broker = Broker::start(&dir, &[]);
    let mut first = broker.connect();
    // A client-chosen "1" first: the broker must not hand out "1" again.
    first.expect("REGISTER:CONSUMER:1", "OK:CONSUMER:1");
    let mut assigned = Vec::new();
    for _ in 0..3 {
        let mut c = broker.connect();
        c.send("REGISTER:CONSUMER");
        let line = c.line();
        let id = line.strip_prefix("OK:CONSUMER:").unwrap().to_string();
        assert!(id.bytes().all(|b| b.is_ascii_digit()), "{line}");
        assert_ne!(id, "1");
        assert!(!assigned.contains(&id));
        assigned.push(id);
    }
    let long = "a".repeat(64);
    let mut c = broker.connect();
    c.expect(
        &format!("REGISTER:CONSUMER:{long}"),
        &format!("OK:CONSUMER:{long}"),
    );
    let mut c = broker.connect();
    c.expect(
        &format!("REGISTER:CONSUMER:{long}a"),
        "ERROR:Invalid registration message",
    );
}

#[test]
fn different_ids_each_get_every_message_and_one_id_shares_the_work() {
    let dir = TestDir::new("proto-fanout");
    let broker = Broker::start(&dir, &[]);
    let mut a = broker.consumer("A");
    let mut b = broker.consumer("B");
    let mut w1 = broker.consumer("W");
    let mut w2 = broker.consumer("W");
    let mut p = broker.producer();
    for n in 1..=6 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
    }
    for c in [&mut a, &mut b] {
        for n in 1..=6 {
            c.send("GET");
            assert_eq!(c.reply(), format!("MSG:{n}:m{n}"));
        }
        c.expect("GET", "ERROR:No messages available");
    }
    // Competing consumers under one id: each message goes to one of them.
    let mut seen = Vec::new();
    for round in 0..3 {
        for c in [&mut w1, &mut w2] {
            c.send("GET");
            let line = c.reply();
            let id: u64 = line
                .split(':')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{round}: {line}"));
            seen.push(id);
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 6]);
    w1.expect("GET", "ERROR:No messages available");
    w2.expect("GET", "ERROR:No messages available");
}

#[test]
fn a_new_id_starts_at_the_oldest_message_still_held() {
    let dir = TestDir::new("proto-newid");
    let broker = Broker::start(&dir, &[]);
    let mut p = broker.producer();
    // No cursor yet: messages are held for consumers to come.
    for n in 1..=3 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
    }
    let mut a = broker.consumer("A");
    a.expect("GET", "MSG:1:m1");
    a.expect("GET", "MSG:2:m2");
    // A is the only cursor, so 1 and 2 are gone; a new id starts at 3.
    let mut late = broker.consumer("late");
    late.expect("GET", "MSG:3:m3");
    late.expect("GET", "ERROR:No messages available");
    a.expect("GET", "MSG:3:m3");
}

#[test]
fn notify_on_registration_with_backlog_and_at_most_one_until_get() {
    let dir = TestDir::new("proto-notify");
    let broker = Broker::start(&dir, &[]);
    let mut p = broker.producer();
    p.expect("SEND:first", "OK:MSG_ID:1");
    let mut c = broker.connect();
    c.send("REGISTER:CONSUMER:n");
    assert_eq!(c.line(), "OK:CONSUMER:n");
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:1");
    // More messages: no second NOTIFY before a GET.
    p.expect("SEND:second", "OK:MSG_ID:2");
    p.expect("SEND:third", "OK:MSG_ID:3");
    c.send("GET");
    assert_eq!(
        c.line(),
        "MSG:1:first",
        "a second NOTIFY came before the GET"
    );
    // The GET cleared the outstanding NOTIFY and two are still waiting:
    // a NOTIFY follows the reply at once.
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:2");
    // Outstanding again: an arrival does not notify.
    p.expect("SEND:fourth", "OK:MSG_ID:4");
    c.send("GET");
    assert_eq!(c.line(), "MSG:2:second");
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:2");
    // Pipelined GETs that take everything: no NOTIFY after them.
    c.send_bytes(b"GET\nGET\nGET\n");
    assert_eq!(c.line(), "MSG:3:third");
    assert_eq!(c.line(), "MSG:4:fourth");
    assert_eq!(c.line(), "ERROR:No messages available");
    // Nothing waiting, nothing outstanding: the next arrival notifies once.
    p.expect("SEND:fifth", "OK:MSG_ID:5");
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:1");
    p.expect("SEND:sixth", "OK:MSG_ID:6");
    c.send("GET");
    assert_eq!(
        c.line(),
        "MSG:5:fifth",
        "a second NOTIFY came before the GET"
    );
    assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:1");
    c.expect("GET", "MSG:6:sixth");
    c.expect("GET", "ERROR:No messages available");

    // A new id starts at the oldest held message; with nothing held it
    // gets no NOTIFY at registration, and one when a message arrives.
    let mut idle = broker.connect();
    idle.send("REGISTER:CONSUMER");
    assert!(idle.line().starts_with("OK:CONSUMER:"));
    p.expect("SEND:seventh", "OK:MSG_ID:7");
    assert_eq!(idle.line(), "NOTIFY:MESSAGES_AVAILABLE:1");
    idle.send("GET");
    assert_eq!(idle.line(), "MSG:7:seventh");
}

#[test]
fn under_fsync_always_a_waiting_consumer_is_notified_and_gets_each_message() {
    // That a message is shown only once fsynced is not observable from
    // outside without a power cut or an fsync fault; what is observable
    // here: a consumer waiting for NOTIFY is notified under `always` too,
    // and a GET right after the producer's OK finds the message.
    let dir = TestDir::new("proto-always");
    let broker = Broker::start(&dir, &["--fsync", "always"]);
    let mut c = broker.consumer("a");
    let mut p = broker.producer();
    for n in 1..=20 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
        assert_eq!(c.line(), "NOTIFY:MESSAGES_AVAILABLE:1");
        c.send("GET");
        assert_eq!(c.line(), format!("MSG:{n}:m{n}"));
    }
}

#[test]
fn stats_reports_the_queue() {
    let dir = TestDir::new("proto-stats");
    let broker = Broker::start(&dir, &["--capacity", "50"]);
    let mut p = broker.producer();
    for n in 1..=4 {
        p.expect(&format!("SEND:m{n}"), &format!("OK:MSG_ID:{n}"));
    }
    let mut c = broker.consumer("s");
    c.expect("GET", "MSG:1:m1");
    c.send("STATS");
    let line = c.reply();
    assert_eq!(stat_value(&line, "capacity"), 50);
    assert_eq!(stat_value(&line, "stored"), 4);
    assert_eq!(stat_value(&line, "delivered"), 1);
    assert_eq!(stat_value(&line, "messages"), 3);
    assert_eq!(stat_value(&line, "next_id"), 5);
    assert_eq!(stat_value(&line, "producers"), 1);
    assert_eq!(stat_value(&line, "consumers"), 1);
    assert_eq!(stat_value(&line, "cursors"), 1);
}
