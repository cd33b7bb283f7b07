//! The migration routes' readers: canary CSV names and the bandwidth limit.

use super::*;

#[test]
fn csv_names() {
    let names = parse_csv_names(b"\xEF\xBB\xBFdevicename,Note\r\na,x\r\n,\r\n\r\nb\nb\n").unwrap();
    assert_eq!(
        names,
        ["a", "b", "b"],
        "duplicates are reported later, per row"
    );
    let e = parse_csv_names(b"Name\nx\n").unwrap_err();
    assert_eq!(
        (e.code(), e.field()),
        (ErrorCode::MissingField, Some("DeviceName"))
    );
    let e = parse_csv_names(b"DeviceName\n").unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidField);
    let mut big = String::from("DeviceName\n");
    for i in 0..MAX_PICKED {
        big.push_str(&format!("d{i}\n"));
    }
    assert_eq!(parse_csv_names(big.as_bytes()).unwrap().len(), MAX_PICKED);
    big.push_str("one-more\n");
    assert_eq!(
        parse_csv_names(big.as_bytes()).unwrap_err().code(),
        ErrorCode::TooManyItems
    );
}

#[test]
fn bandwidth_accepts_numbers_and_numeric_strings() {
    let r: ConfigRequest = parse_json(
        br#"{"migration_method":"incremental_migration","resume_mode":"auto","bandwidth_limit_mb":"123"}"#,
    )
    .unwrap();
    assert_eq!(r.bandwidth_limit_mb, Some(123));
    let r: ConfigRequest = parse_json(
        br#"{"migration_method":"full_migration","resume_mode":"manual","bandwidth_limit_mb":7}"#,
    )
    .unwrap();
    assert_eq!(r.bandwidth_limit_mb, Some(7));
    let e = parse_json::<ConfigRequest>(
        br#"{"migration_method":"full_migration","resume_mode":"manual","bandwidth_limit_mb":"lots"}"#,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("bandwidth_limit_mb"), "{e}");
    let e = parse_json::<ConfigRequest>(br#"{"migration_method":"full_migration"}"#).unwrap_err();
    assert_eq!(
        (e.code(), e.field()),
        (ErrorCode::MissingField, Some("resume_mode"))
    );
    let e = parse_json::<ConfigRequest>(br#"{"migration_method":"sideways","resume_mode":"auto"}"#)
        .unwrap_err();
    assert_eq!(e.field(), Some("migration_method"));
}
