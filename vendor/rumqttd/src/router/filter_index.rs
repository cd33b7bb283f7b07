//! fleetgate patch (see PATCHES.md at the crate root): the filters a topic may match, found
//! without comparing the topic with every filter.
//!
//! Stock rumqttd compares a topic it has not routed before with every subscription filter the
//! router ever saw, and a filter it has not seen before with every topic it ever routed. With
//! one filter set per device (`/{pk}/{dn}/…`) both grow with the fleet, so a broadcast to N
//! devices on N new topics costs N × N comparisons on the router's single thread.
//!
//! A filter's *literal prefix* is its levels before the first wildcard (`+` or `#`); every topic
//! it matches starts with exactly those levels. The index keeps each filter under its literal
//! prefix, by the prefix's number of levels: the candidates for a topic of L levels are the
//! filters under the topic's own first k levels, for k = 0..=L — at most L + 1 hash lookups —
//! and each candidate is still checked with [`matches`](crate::protocol::matches), so the
//! result is exactly the stock one.

use std::collections::HashMap;

/// Filters by literal prefix: `by_levels[k]` maps a prefix of k levels (joined by `/`) to the
/// filters whose literal prefix it is.
#[derive(Debug, Default)]
pub struct FilterIndex {
    by_levels: Vec<HashMap<String, Vec<(String, usize)>>>,
}

/// The literal prefix of `filter`: its number of levels and its text.
pub fn literal_prefix(filter: &str) -> (usize, &str) {
    let mut end = 0;
    for (k, level) in filter.split('/').enumerate() {
        if level == "+" || level == "#" {
            return (k, &filter[..end]);
        }
        // The end of the first k + 1 levels (the separator before this level, if any, is
        // included by the `+ 1` of the previous level).
        end = if k == 0 {
            level.len()
        } else {
            end + 1 + level.len()
        };
    }
    (filter.split('/').count(), filter)
}

impl FilterIndex {
    pub fn insert(&mut self, filter: &str, idx: usize) {
        let (levels, prefix) = literal_prefix(filter);
        if self.by_levels.len() <= levels {
            self.by_levels.resize_with(levels + 1, HashMap::new);
        }
        self.by_levels[levels]
            .entry(prefix.to_owned())
            .or_default()
            .push((filter.to_owned(), idx));
    }

    /// Every filter whose literal prefix is a prefix (in levels) of `topic`: a superset of the
    /// filters `topic` matches.
    pub fn candidates<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a (String, usize)> {
        // The byte end of the topic's first k levels, for k = 0..=L.
        let ends = std::iter::once(None).chain(
            topic
                .match_indices('/')
                .map(|(i, _)| Some(i))
                .chain(std::iter::once(Some(topic.len()))),
        );
        ends.enumerate()
            .take(self.by_levels.len())
            .filter_map(move |(k, end)| {
                let prefix = end.map_or("", |end| &topic[..end]);
                self.by_levels[k].get(prefix)
            })
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::{literal_prefix, FilterIndex};
    use crate::protocol::matches;

    #[test]
    fn literal_prefixes() {
        assert_eq!(literal_prefix("a/b/c"), (3, "a/b/c"));
        assert_eq!(literal_prefix("a/+/c"), (1, "a"));
        assert_eq!(literal_prefix("a/b/#"), (2, "a/b"));
        assert_eq!(literal_prefix("#"), (0, ""));
        assert_eq!(literal_prefix("+/b"), (0, ""));
        assert_eq!(literal_prefix("/pk/dn/+"), (3, "/pk/dn"));
        assert_eq!(literal_prefix("/+"), (1, ""));
        assert_eq!(literal_prefix("/"), (2, "/"));
        assert_eq!(literal_prefix("a//b"), (3, "a//b"));
    }

    /// The index finds exactly what comparing with every filter finds, on a table of filters
    /// and topics that exercises empty levels, leading and trailing separators and wildcards
    /// at every position.
    #[test]
    fn candidates_then_matches_equals_a_full_scan() {
        let filters = [
            "#",
            "+",
            "+/+",
            "/#",
            "/+",
            "/",
            "a",
            "a/#",
            "a/+",
            "a/b",
            "a/b/#",
            "a/+/c",
            "+/b/c",
            "a//c",
            "a/+/+",
            "/pk/dn/user/cmd",
            "/pk/dn/user/+",
            "/pk/+/user/cmd",
            "/pk/dn/#",
            "/sys/pk/dn/rrpc/request/+",
            "$SYS/#",
            "a/b/c/d",
        ];
        let topics = [
            "a",
            "a/b",
            "a/b/c",
            "a//c",
            "a/x/c",
            "/",
            "//",
            "",
            "/pk/dn/user/cmd",
            "/pk/other/user/cmd",
            "/pk/dn/user/x",
            "/pk/dn",
            "/sys/pk/dn/rrpc/request/17",
            "$SYS/x",
            "b/b/c",
            "a/b/c/d",
            "a/b/c/d/e",
        ];
        let mut index = FilterIndex::default();
        for (idx, filter) in filters.iter().enumerate() {
            index.insert(filter, idx);
        }
        for topic in topics {
            let mut found: Vec<usize> = index
                .candidates(topic)
                .filter(|(filter, _)| matches(topic, filter))
                .map(|(_, idx)| *idx)
                .collect();
            found.sort_unstable();
            let want: Vec<usize> = (0..filters.len())
                .filter(|&idx| matches(topic, filters[idx]))
                .collect();
            assert_eq!(found, want, "topic {topic:?}");
        }
    }
}
