use guestwatch_testkit::{RedisServer, in_ci};

#[test]
fn redis_keeps_data_across_a_crash() {
    let mut redis = match RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            assert!(!in_ci(), "CI must have redis-server: {e}");
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    assert!(redis.command("XADD s * a 1").unwrap().starts_with('$'));
    assert_eq!(redis.command("XLEN s").unwrap(), ":1\r\n");
    redis.stop();
    assert!(redis.command("PING").is_err());
    redis.restart().unwrap();
    assert_eq!(
        redis.command("XLEN s").unwrap(),
        ":1\r\n",
        "data lost across the restart"
    );
}
