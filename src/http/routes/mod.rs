pub mod health;
pub mod items;
mod query;
pub mod runs;
