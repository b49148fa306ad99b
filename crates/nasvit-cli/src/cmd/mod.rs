pub mod flops;
pub mod import;
pub mod space;
pub mod unimplemented;
