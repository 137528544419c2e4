//! NOTIFY payload (JSON text) -> what the capture task does with it; pure, no I/O.
//!
//! The payload contract is documented at the top of `sql/install.sql`.

use serde::Deserialize;

use crate::event::ChangeEvent;

/// A decoded `pgrelay` notification.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A whole event carried in the payload (one small row).
    Event(Box<ChangeEvent>),
    /// A statement whose rows must be read from `pgrelay.changes`: the rows of transaction
    /// `xid` with `from <= seq <= to`.
    Pointer {
        /// Writer's transaction id.
        xid: u64,
        /// First seq of the statement.
        from: i64,
        /// Last seq of the statement.
        to: i64,
        /// How many rows the statement logged.
        rows: i64,
        /// The statement's table, `(schema, table)` (absent from payloads of older triggers).
        table: Option<(String, String)>,
    },
    /// A marker the relay sent itself (the catch-up horizon, DESIGN.md guarantee 2).
    Marker(String),
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not one of the payload shapes.
    #[error("Malformed payload: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A pointer whose range is empty or reversed.
    #[error("Pointer range {from}..={to} is invalid")]
    BadRange {
        /// First seq.
        from: i64,
        /// Last seq.
        to: i64,
    },
}

#[derive(Deserialize)]
#[serde(tag = "k")]
enum Raw {
    #[serde(rename = "e")]
    Event(Box<ChangeEvent>),
    #[serde(rename = "p")]
    Pointer {
        xid: String,
        from: i64,
        to: i64,
        n: i64,
        #[serde(default)]
        schema: Option<String>,
        #[serde(default)]
        table: Option<String>,
    },
    #[serde(rename = "m")]
    Marker { id: String },
}

/// Decodes one notification payload.
pub fn decode(payload: &str) -> Result<Payload, DecodeError> {
    match serde_json::from_str::<Raw>(payload)? {
        Raw::Event(event) => Ok(Payload::Event(event)),
        Raw::Pointer {
            xid,
            from,
            to,
            n,
            schema,
            table,
        } => {
            let xid = xid
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("xid {xid:?} is not a number")))
                .map_err(DecodeError::Malformed)?;
            if from > to || from < 1 {
                return Err(DecodeError::BadRange { from, to });
            }
            Ok(Payload::Pointer {
                xid,
                from,
                to,
                rows: n,
                table: schema.zip(table),
            })
        }
        Raw::Marker { id } => Ok(Payload::Marker(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Op;
    use serde_json::json;

    #[test]
    fn decodes_the_payloads_the_trigger_sends() {
        // Copied from a real `LISTEN pgrelay` session against sql/install.sql.
        let inline = r#"{"k": "e", "id": 1, "op": "create", "ts": "2026-11-27T06:21:29.43515+00:00", "old": null, "seq": 1, "xid": "758", "data": {"id": 1, "name": "apple", "price": 10.5}, "table": "items", "schema": "public"}"#;
        let Payload::Event(e) = decode(inline).unwrap() else {
            panic!("expected an inline event")
        };
        assert_eq!((e.seq, e.xid, e.op), (1, 758, Op::Create));
        assert_eq!(
            e.data,
            Some(json!({"id": 1, "name": "apple", "price": 10.5}))
        );
        assert_eq!(e.old, None);

        let pointer = r#"{"k" : "p", "xid" : "759", "from" : 2, "to" : 4, "n" : 3, "schema" : "public", "table" : "items"}"#;
        assert_eq!(
            decode(pointer).unwrap(),
            Payload::Pointer {
                xid: 759,
                from: 2,
                to: 4,
                rows: 3,
                table: Some(("public".into(), "items".into())),
            }
        );
        // Payloads of triggers installed by an earlier version name no table.
        let old = r#"{"k":"p","xid":"1","from":2,"to":4,"n":3}"#;
        assert!(matches!(
            decode(old).unwrap(),
            Payload::Pointer { table: None, .. }
        ));
        assert_eq!(
            decode(r#"{"k":"m","id":"7"}"#).unwrap(),
            Payload::Marker("7".into())
        );
    }

    #[test]
    fn rejects_bad_payloads() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"k":"x"}"#,
            r#"{"k":"p","xid":"abc","from":1,"to":2,"n":2}"#,
            r#"{"k":"p","xid":"1","from":5,"to":2,"n":2}"#,
            r#"{"k":"e","seq":1}"#,
            r#"{"k":"e","id":1,"op":"upsert","ts":"","seq":1,"xid":"1","table":"t","schema":"s"}"#,
        ] {
            assert!(decode(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
