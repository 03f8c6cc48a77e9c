//! A consumer group's members, through librdkafka's `DescribeConsumerGroups`
//! admin call, which the `rdkafka` crate does not wrap.
//!
//! The classic `DescribeGroups` request (what `fetch_group_list` sends)
//! knows only groups on the classic protocol. A group whose members run
//! `group.protocol=consumer` (KIP-848, the default of Kafka 4's Java
//! client for new applications) is answered as dead, with no member, even
//! while it consumes. librdkafka's admin call asks with
//! `ConsumerGroupDescribe` and falls back to `DescribeGroups` for a classic
//! group, so both kinds are seen as they are.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::Member;

/// What the coordinator says of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// `Stable`, `Empty`, `Dead`, `PreparingRebalance`, …
    pub state: &'static str,
    /// `consumer` (KIP-848), `classic`, or `unknown` (a broker before 3.7).
    pub protocol: &'static str,
    pub members: Vec<Member>,
}

/// Owns what librdkafka hands out, so every return path frees it.
struct Owned<T> {
    ptr: *mut T,
    free: unsafe extern "C" fn(*mut T),
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from the librdkafka constructor that `free`
            // undoes, and is freed once, here.
            unsafe { (self.free)(self.ptr) }
        }
    }
}

fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: librdkafka returns NUL-terminated strings that live as long
    // as the event they belong to, which outlives this copy.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn state(s: rd::rd_kafka_consumer_group_state_t) -> &'static str {
    use rd::rd_kafka_consumer_group_state_t as S;
    match s {
        S::RD_KAFKA_CONSUMER_GROUP_STATE_PREPARING_REBALANCE => "PreparingRebalance",
        S::RD_KAFKA_CONSUMER_GROUP_STATE_COMPLETING_REBALANCE => "CompletingRebalance",
        S::RD_KAFKA_CONSUMER_GROUP_STATE_STABLE => "Stable",
        S::RD_KAFKA_CONSUMER_GROUP_STATE_DEAD => "Dead",
        S::RD_KAFKA_CONSUMER_GROUP_STATE_EMPTY => "Empty",
        _ => "Unknown",
    }
}

fn protocol(t: rd::rd_kafka_consumer_group_type_t) -> &'static str {
    use rd::rd_kafka_consumer_group_type_t as T;
    match t {
        T::RD_KAFKA_CONSUMER_GROUP_TYPE_CONSUMER => "consumer",
        T::RD_KAFKA_CONSUMER_GROUP_TYPE_CLASSIC => "classic",
        _ => "unknown",
    }
}

/// Describes `group` through `client`'s connection. `Err` carries
/// librdkafka's own words; a group the coordinator does not know is
/// `Dead` with no member, as Kafka's own tool shows it.
pub fn describe(
    client: &BaseConsumer,
    group: &str,
    timeout: Duration,
) -> Result<Described, String> {
    let rk = client.client().native_ptr();
    let name = CString::new(group).map_err(|_| format!("group name {group:?} holds a NUL"))?;
    // SAFETY: every pointer below comes from librdkafka for `rk`, which the
    // caller's consumer keeps alive; each is checked for NULL before use and
    // freed by its `Owned` guard; strings are copied out before the event
    // that owns them is destroyed.
    unsafe {
        let queue = Owned {
            ptr: rd::rd_kafka_queue_new(rk),
            free: rd::rd_kafka_queue_destroy,
        };
        let options = Owned {
            ptr: rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
            ),
            free: rd::rd_kafka_AdminOptions_destroy,
        };
        if queue.ptr.is_null() || options.ptr.is_null() {
            return Err("librdkafka could not allocate an admin request".into());
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut err = [0 as c_char; 512];
        rd::rd_kafka_AdminOptions_set_request_timeout(options.ptr, ms, err.as_mut_ptr(), 512);
        let mut names = [name.as_ptr()];
        rd::rd_kafka_DescribeConsumerGroups(rk, names.as_mut_ptr(), 1, options.ptr, queue.ptr);
        // One more second than the request's own timeout, which then
        // answers with its error rather than leaving us with nothing.
        let event = Owned {
            ptr: rd::rd_kafka_queue_poll(queue.ptr, ms.saturating_add(1000)),
            free: rd::rd_kafka_event_destroy,
        };
        if event.ptr.is_null() {
            return Err(format!("no answer within {} s", timeout.as_secs() + 1));
        }
        if rd::rd_kafka_event_error(event.ptr)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return Err(text(rd::rd_kafka_event_error_string(event.ptr)));
        }
        let result = rd::rd_kafka_event_DescribeConsumerGroups_result(event.ptr);
        if result.is_null() {
            return Err("the answer was not a group description".into());
        }
        let mut n = 0usize;
        let groups = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut n);
        for i in 0..n {
            let g = *groups.add(i);
            if text(rd::rd_kafka_ConsumerGroupDescription_group_id(g)) != group {
                continue;
            }
            let e = rd::rd_kafka_ConsumerGroupDescription_error(g);
            if !e.is_null() {
                if rd::rd_kafka_error_code(e)
                    == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND
                {
                    break;
                }
                return Err(text(rd::rd_kafka_error_string(e)));
            }
            let members = (0..rd::rd_kafka_ConsumerGroupDescription_member_count(g))
                .map(|j| {
                    let m = rd::rd_kafka_ConsumerGroupDescription_member(g, j);
                    Member {
                        id: text(rd::rd_kafka_MemberDescription_consumer_id(m)),
                        client_id: text(rd::rd_kafka_MemberDescription_client_id(m)),
                        host: text(rd::rd_kafka_MemberDescription_host(m)),
                    }
                })
                .collect();
            return Ok(Described {
                state: state(rd::rd_kafka_ConsumerGroupDescription_state(g)),
                protocol: protocol(rd::rd_kafka_ConsumerGroupDescription_type(g)),
                members,
            });
        }
        Ok(Described {
            state: "Dead",
            protocol: "unknown",
            members: Vec::new(),
        })
    }
}
