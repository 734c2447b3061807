"""Task evaluators: NYU depth metrics, COCO box/mask AP."""
