//! A stand-in for the host's `read`, for native tests of the core module's
//! request (`request::hosted`): each test thread sets the items its host
//! holds and sees every read the request made.

use std::cell::RefCell;

use super::wire::Item;

#[derive(Default)]
struct FakeHost {
    /// (item, key, bytes) the host holds.
    items: Vec<(Item, String, Vec<u8>)>,
    /// (item, key) of every read, in order.
    reads: Vec<(Item, String)>,
}

thread_local! {
    static HOST: RefCell<FakeHost> = RefCell::new(FakeHost::default());
}

/// Makes the host hold `bytes` as `item` (with `key` for HEADER and
/// ATTRIBUTE, "" otherwise).
pub(crate) fn hold(item: Item, key: &str, bytes: impl Into<Vec<u8>>) {
    let entry = (item, key.to_owned(), bytes.into());
    HOST.with(|host| host.borrow_mut().items.push(entry));
}

/// Every read so far, as (item, key).
pub(crate) fn reads() -> Vec<(Item, String)> {
    HOST.with(|host| host.borrow().reads.clone())
}

/// The host's `read`: HEADER keys match without regard to ASCII case, as
/// the host's do.
pub(crate) fn read<T>(item: Item, key: &str, decode: impl FnOnce(&[u8]) -> T) -> Option<T> {
    let bytes = HOST.with(|host| {
        let mut host = host.borrow_mut();
        host.reads.push((item, key.to_owned()));
        let found = host.items.iter().find(|(i, k, _)| {
            *i == item
                && match item {
                    Item::Header => k.eq_ignore_ascii_case(key),
                    _ => k == key,
                }
        });
        found.map(|(_, _, bytes)| bytes.clone())
    });
    bytes.map(|bytes| decode(&bytes))
}
