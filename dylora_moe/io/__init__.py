"""Files: the checkpoint (each expert a stock peft adapter), atomic folder publishing, and the original's files."""
