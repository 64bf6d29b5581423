// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! ficus patch: the spelling of each header name, kept beside the header map (which holds
//! names lowercase) so that a header block is written out as it was read.

use crate::case_header_name::CaseHeaderName;
use crate::{HMap, IntoCaseHeaderName};
use http::header::{AsHeaderName, HeaderName, MaxSizeReached};

/// The spelling of each header in a header map, in the order the map iterates.
///
/// Most header blocks name each field once and are only added to, so the spellings start as
/// a list: adding a header pushes its spelling, where a second map would hash the name again,
/// and a copy of the block copies a vector. A name added a second time turns the list into
/// such a map, keyed as the header map is: given the same operations the two iterate alike.
///
/// The list follows the map's order: a new name goes last, a replaced value keeps its place,
/// and a removed name's place is taken by the last one (`http`'s `swap_remove`). The tests
/// below hold the `http` crate to that, and the writer checks each spelling against its name.
#[derive(Debug, Clone)]
pub(crate) enum CaseNames {
    /// Every name has one value, and the `i`-th spelling is the map's `i`-th name's.
    List(Vec<CaseHeaderName>),
    /// A map given the same operations as the header map.
    Map(HMap<CaseHeaderName>),
}

impl CaseNames {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        CaseNames::List(Vec::with_capacity(capacity))
    }

    /// Appends `value` under `name` to `values`, and `case` here; true if `name` was there.
    pub(crate) fn append<T>(
        &mut self,
        values: &mut HMap<T>,
        name: HeaderName,
        case: CaseHeaderName,
        value: T,
    ) -> Result<bool, MaxSizeReached> {
        match self {
            CaseNames::Map(cases) => {
                cases.try_append(name.clone(), case)?;
                values.try_append(name, value)
            }
            CaseNames::List(list) => {
                let existed = values.try_append(name, value)?;
                if existed {
                    *self = CaseNames::Map(map_after_second_value(list, values, case)?);
                } else {
                    list.push(case);
                }
                Ok(existed)
            }
        }
    }

    /// Sets `value` as the only one under `name` in `values`, and `case` as its spelling.
    pub(crate) fn insert<T>(
        &mut self,
        values: &mut HMap<T>,
        name: HeaderName,
        case: CaseHeaderName,
        value: T,
    ) -> Result<(), MaxSizeReached> {
        match self {
            CaseNames::Map(cases) => {
                cases.try_insert(name.clone(), case)?;
                values.try_insert(name, value)?;
            }
            CaseNames::List(list) => {
                if values.try_insert(name, value)?.is_some() {
                    // The name's one value was replaced where it stood.
                    match list.iter().position(|old| same_name(old, &case)) {
                        Some(at) => list[at] = case,
                        None => {
                            // Not reached while the list follows the map; if it ever did not,
                            // every name is still written, in the case `http` gives it.
                            debug_assert!(false, "no spelling of a name in the map");
                            *self = CaseNames::Map(default_spellings(values)?);
                        }
                    }
                } else {
                    list.push(case);
                }
            }
        }
        Ok(())
    }

    /// Removes every value under `name` from `values`, and their spellings here.
    pub(crate) fn remove<'a, T, N: ?Sized>(&mut self, values: &mut HMap<T>, name: &'a N) -> Option<T>
    where
        &'a N: 'a + AsHeaderName,
    {
        let removed = values.remove(name)?;
        match self {
            CaseNames::Map(cases) => {
                cases.remove(name);
            }
            CaseNames::List(list) => {
                // The removed name's place holds the last one now (or nothing, if it was
                // last): the first place whose name the list does not spell.
                let moved = values
                    .keys()
                    .zip(list.iter())
                    .position(|(name, case)| !spells(case, name));
                match moved {
                    Some(at) => {
                        list.swap_remove(at);
                    }
                    None => {
                        list.pop();
                    }
                }
            }
        }
        Some(removed)
    }

    /// Makes room for `additional` more names.
    pub(crate) fn reserve(&mut self, additional: usize) {
        match self {
            CaseNames::Map(cases) => {
                let _ = cases.try_reserve(additional);
            }
            CaseNames::List(list) => list.reserve(additional),
        }
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        match self {
            CaseNames::Map(cases) => cases.capacity(),
            CaseNames::List(list) => list.capacity(),
        }
    }

    /// Each header of `values` with its spelling, in `values`' order.
    pub(crate) fn iter<'a, T>(
        &'a self,
        values: &'a HMap<T>,
    ) -> impl Iterator<Item = (&'a HeaderName, &'a CaseHeaderName, &'a T)> + 'a {
        let (list, map) = match self {
            CaseNames::List(list) => (list.as_slice(), None),
            CaseNames::Map(map) => (&[][..], Some(map)),
        };
        let listed = values.iter().zip(list).map(|((name, value), case)| {
            // A spelling of another name would put this value under that name: a length
            // compare catches a list out of step, the full one costs a loop per header.
            debug_assert!(spells(case, name), "header iter mismatch {name}, {case:?}");
            assert_eq!(case.as_slice().len(), name.as_str().len(), "header iter mismatch");
            (name, case, value)
        });
        let mapped = map.into_iter().flat_map(move |map| {
            values
                .iter()
                .zip(map.iter())
                .map(|((name, value), (keyed, case))| {
                    // in case the header iteration order changes in future versions of HMap
                    assert_eq!(name, keyed, "header iter mismatch {name}, {keyed}");
                    (name, case, value)
                })
        });
        listed.chain(mapped)
    }
}

/// Whether `case` spells `name` (which `http` keeps lowercase).
fn spells(case: &CaseHeaderName, name: &HeaderName) -> bool {
    case.as_slice().eq_ignore_ascii_case(name.as_str().as_bytes())
}

/// Whether two spellings are of the same name.
fn same_name(a: &CaseHeaderName, b: &CaseHeaderName) -> bool {
    a.as_slice().eq_ignore_ascii_case(b.as_slice())
}

/// A map spelling each name of `values` as a header block without case would.
fn default_spellings<T>(values: &HMap<T>) -> Result<HMap<CaseHeaderName>, MaxSizeReached> {
    let mut cases = HMap::try_with_capacity(values.keys_len())?;
    for (name, _) in values.iter() {
        cases.try_append(name.clone(), name.into_case_header_name())?;
    }
    Ok(cases)
}

/// A map of the spellings in `list`, for `values` just after one of its names, each of which
/// had one value, was given a second, spelled `case`.
fn map_after_second_value<T>(
    list: &mut Vec<CaseHeaderName>,
    values: &HMap<T>,
    case: CaseHeaderName,
) -> Result<HMap<CaseHeaderName>, MaxSizeReached> {
    let mut cases = HMap::try_with_capacity(values.keys_len())?;
    let mut spellings = list.drain(..);
    let mut second = Some(case);
    let mut previous: Option<&HeaderName> = None;
    for (name, _) in values.iter() {
        // The one name seen twice in a row: its second value is the one just appended.
        let spelling = if previous == Some(name) {
            second.take()
        } else {
            spellings.next()
        };
        let spelling = spelling.unwrap_or_else(|| name.into_case_header_name());
        cases.try_append(name.clone(), spelling)?;
        previous = Some(name);
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn spellings(names: &CaseNames, values: &HMap) -> Vec<(String, String)> {
        names
            .iter(values)
            .map(|(_, case, value)| {
                (
                    String::from_utf8(case.as_slice().to_vec()).unwrap(),
                    value.to_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn append(names: &mut CaseNames, values: &mut HMap, case: &'static str, value: &str) -> bool {
        let (name, case) = case.into_header_names().unwrap();
        let value = HeaderValue::from_str(value).unwrap();
        names.append(values, name, case, value).unwrap()
    }

    fn insert(names: &mut CaseNames, values: &mut HMap, case: &'static str, value: &str) {
        let (name, case) = case.into_header_names().unwrap();
        let value = HeaderValue::from_str(value).unwrap();
        names.insert(values, name, case, value).unwrap()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn block() -> (CaseNames, HMap) {
        let mut names = CaseNames::with_capacity(4);
        let mut values = HMap::new();
        for (case, value) in [("Host", "h"), ("x-user", "u"), ("X-Trace", "t"), ("ACCEPT", "a")] {
            assert!(!append(&mut names, &mut values, case, value));
        }
        (names, values)
    }

    #[test]
    fn names_each_added_once_are_a_list_in_the_maps_order() {
        let (names, values) = block();
        assert!(matches!(names, CaseNames::List(_)));
        let expected = [("Host", "h"), ("x-user", "u"), ("X-Trace", "t"), ("ACCEPT", "a")];
        assert_eq!(spellings(&names, &values), pairs(&expected));
    }

    #[test]
    fn a_replaced_value_keeps_its_place_and_takes_the_new_spelling() {
        let (mut names, mut values) = block();
        insert(&mut names, &mut values, "X-USER", "v");
        insert(&mut names, &mut values, "X-New", "n");
        assert!(matches!(names, CaseNames::List(_)));
        let expected = [
            ("Host", "h"),
            ("X-USER", "v"),
            ("X-Trace", "t"),
            ("ACCEPT", "a"),
            ("X-New", "n"),
        ];
        assert_eq!(spellings(&names, &values), pairs(&expected));
    }

    #[test]
    fn a_removed_names_place_is_taken_by_the_last() {
        let (mut names, mut values) = block();
        assert!(names.remove(&mut values, "x-user").is_some());
        assert!(names.remove(&mut values, "x-absent").is_none());
        let expected = [("Host", "h"), ("ACCEPT", "a"), ("X-Trace", "t")];
        assert_eq!(spellings(&names, &values), pairs(&expected));
        assert!(names.remove(&mut values, "x-trace").is_some());
        assert_eq!(spellings(&names, &values), pairs(&[("Host", "h"), ("ACCEPT", "a")]));
        for name in ["host", "accept"] {
            assert!(names.remove(&mut values, name).is_some());
        }
        assert!(spellings(&names, &values).is_empty());
        assert!(matches!(names, CaseNames::List(list) if list.is_empty()));
    }

    #[test]
    fn a_name_added_twice_turns_the_list_into_a_map_that_keeps_every_spelling() {
        let (mut names, mut values) = block();
        assert!(append(&mut names, &mut values, "X-USER", "u2"));
        assert!(matches!(names, CaseNames::Map(_)));
        let expected = [
            ("Host", "h"),
            ("x-user", "u"),
            ("X-USER", "u2"),
            ("X-Trace", "t"),
            ("ACCEPT", "a"),
        ];
        assert_eq!(spellings(&names, &values), pairs(&expected));
        // As a map, it follows every change as before.
        assert!(append(&mut names, &mut values, "Host", "h2"));
        assert!(names.remove(&mut values, "x-trace").is_some());
        insert(&mut names, &mut values, "x-USER", "one");
        let expected = [
            ("Host", "h"),
            ("Host", "h2"),
            ("x-USER", "one"),
            ("ACCEPT", "a"),
        ];
        assert_eq!(spellings(&names, &values), pairs(&expected));
    }

    #[test]
    fn a_name_added_twice_in_a_row_is_mapped_in_order() {
        let mut names = CaseNames::with_capacity(0);
        let mut values = HMap::new();
        append(&mut names, &mut values, "Set-Cookie", "a");
        append(&mut names, &mut values, "set-cookie", "b");
        append(&mut names, &mut values, "SET-COOKIE", "c");
        let expected = [("Set-Cookie", "a"), ("set-cookie", "b"), ("SET-COOKIE", "c")];
        assert_eq!(spellings(&names, &values), pairs(&expected));
    }

    #[test]
    fn every_change_leaves_the_list_spelling_the_maps_names() {
        // Random changes to a block of a few names: the list, where it stays one, always
        // spells the map's names in the map's order.
        let cases = ["A", "b", "C-c", "dd", "E-E", "f"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..200 {
            let mut names = CaseNames::with_capacity(0);
            let mut values = HMap::new();
            for step in 0..30 {
                let case = cases[next(cases.len())];
                match next(4) {
                    0 if matches!(names, CaseNames::List(_)) => {
                        if values.contains_key(case.to_ascii_lowercase().as_str()) {
                            continue;
                        }
                        append(&mut names, &mut values, case, &step.to_string());
                    }
                    1 => insert(&mut names, &mut values, case, &step.to_string()),
                    _ => {
                        names.remove(&mut values, case.to_ascii_lowercase().as_str());
                    }
                }
                if let CaseNames::List(list) = &names {
                    assert_eq!(list.len(), values.len());
                    for ((name, _), case) in values.iter().zip(list) {
                        assert!(spells(case, name), "{name} spelled {case:?}");
                    }
                }
            }
        }
    }
}
