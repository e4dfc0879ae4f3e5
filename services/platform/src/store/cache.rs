//! A bounded map of recently used states, for deciding commands without a
//! read: a state from here may be stale (another process may have moved the
//! stream), which the append's optimistic check catches, so only a command
//! that was appended is known to have been decided on current state.
//!
//! Two generations stand in for least-recently-used order: entries go into
//! the young one; when it is full it becomes the old one and the old one is
//! dropped; a hit in the old generation moves the entry back to the young.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

pub struct Cache<K, V> {
    capacity: usize,
    generations: Mutex<(HashMap<K, V>, HashMap<K, V>)>,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    /// Keeps between `capacity / 2` and `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            generations: Mutex::new((HashMap::new(), HashMap::new())),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = g.0.get(key) {
            return Some(v.clone());
        }
        let v = g.1.remove(key)?;
        Self::insert_young(&mut g, self.capacity, key.clone(), v.clone());
        Some(v)
    }

    pub fn put(&self, key: K, value: V) {
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        g.1.remove(&key);
        Self::insert_young(&mut g, self.capacity, key, value);
    }

    pub fn remove(&self, key: &K) {
        let mut g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        g.0.remove(key);
        g.1.remove(key);
    }

    pub fn len(&self) -> usize {
        let g = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        g.0.len() + g.1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert_young(g: &mut (HashMap<K, V>, HashMap<K, V>), capacity: usize, key: K, value: V) {
        if g.0.len() >= capacity / 2 && !g.0.contains_key(&key) {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::Cache;

    #[test]
    fn holds_recent_entries_and_stays_bounded() {
        let cache = Cache::new(4);
        for i in 0..10 {
            cache.put(i, i * 10);
        }
        assert!(cache.len() <= 4);
        assert_eq!(cache.get(&9), Some(90));
        assert_eq!(cache.get(&0), None);
    }

    #[test]
    fn a_hit_in_the_old_generation_survives_the_next_turnover() {
        let cache = Cache::new(4);
        cache.put(1, "a");
        cache.put(2, "b");
        cache.put(3, "c"); // 1 and 2 move to the old generation
        assert_eq!(cache.get(&1), Some("a")); // back to the young one
        cache.put(4, "d"); // the young generation (3, 1) turns over
        cache.put(5, "e");
        assert_eq!(cache.get(&1), Some("a"));
        assert_eq!(cache.get(&2), None);
    }

    #[test]
    fn removed_entries_are_gone_from_both_generations() {
        let cache = Cache::new(4);
        cache.put(1, "a");
        cache.put(2, "b");
        cache.put(3, "c");
        cache.remove(&1);
        cache.remove(&3);
        assert_eq!(cache.get(&1), None);
        assert_eq!(cache.get(&3), None);
        assert_eq!(cache.get(&2), Some("b"));
    }
}
