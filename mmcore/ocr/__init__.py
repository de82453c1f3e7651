"""OCR: engines fill empty ``text_info`` from the image, in a run or as a batch command."""
