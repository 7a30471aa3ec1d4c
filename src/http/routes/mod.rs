pub mod health;
pub mod items;
pub mod runs;
