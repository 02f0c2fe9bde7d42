"""speaker_embed: utterance and speaker embeddings from a speech corpus (seed 004)."""
