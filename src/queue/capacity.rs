//! How many more connections the server takes: checked at start-up, because a fleet that does
//! not fit would take every free connection of a shared server, starve its other users, and still
//! start (its last children retrying "too many clients" for ever).

use std::time::Duration;

use postgres::Client;

use super::sql;
use super::QueueError;

/// The connections still free for this role on this database, as the server counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headroom {
    /// Connections this role may still open here (the session that asked not counted as used).
    pub free: i64,
    /// What bounds `free`, for the message: the server's `max_connections` (with what is
    /// reserved and in use), or the role's or the database's `CONNECTION LIMIT`.
    pub bound_by: String,
}

/// The headroom seen from `client`, which was opened with `url` and took `connected_in` to
/// connect; `None` when the connection does not go straight to PostgreSQL. Behind a pooler
/// (PgBouncer and the like) the clients do not each hold a server connection, so the server's
/// count says nothing about them: the session is taken for pooled when the server listens on
/// another port than the URL names, or when it was started before this connection was made.
pub fn headroom(
    url: &str,
    connected_in: Duration,
    client: &mut Client,
) -> Result<Option<Headroom>, QueueError> {
    let url_port = url
        .parse::<postgres::Config>()?
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432);
    // A second of slack between the server's clock for the session start and now().
    let own_within = connected_in.as_secs_f64() + 1.0;
    let row = client.query_one(sql::CONNECTION_HEADROOM, &[&own_within])?;
    let server_port: i32 = row.get("port");
    let own_session: bool = row.get("own_session");
    if i32::from(url_port) != server_port || !own_session {
        return Ok(None);
    }
    let max: i32 = row.get("max_connections");
    let reserved: i32 = row.get("reserved");
    let in_use: i32 = row.get("in_use");
    let mut room = Headroom {
        free: i64::from(max - reserved - in_use),
        bound_by: format!("max_connections={max}, {reserved} reserved, {in_use} in use"),
    };
    for (column, what) in [
        ("role_free", "the role's CONNECTION LIMIT"),
        ("database_free", "the database's CONNECTION LIMIT"),
    ] {
        if let Some(free) = row.get::<_, Option<i32>>(column) {
            if i64::from(free) < room.free {
                room = Headroom {
                    free: i64::from(free),
                    bound_by: what.to_string(),
                };
            }
        }
    }
    Ok(Some(room))
}
