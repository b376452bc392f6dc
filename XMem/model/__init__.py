"""The XMem network: encoders, decoder and the maths of memory reading."""
