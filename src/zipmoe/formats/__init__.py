"""The container format (writer, reader, manifest) and Hugging Face checkpoint input."""
