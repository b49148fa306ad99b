//! Model-independent parts of NASViT supernet training.
