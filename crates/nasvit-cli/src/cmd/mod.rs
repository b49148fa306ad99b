pub mod flops;
pub mod space;
pub mod unimplemented;
