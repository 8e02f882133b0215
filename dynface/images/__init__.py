"""Images and faces: decoding, colour, detection and alignment, paste-back, folders, degradations."""
