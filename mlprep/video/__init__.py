"""The video_frames pipeline: video-text pairs -> uniformly sampled, resized frames in CLIP4MC pkl shards."""
