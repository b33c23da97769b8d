"""Fine-tune timm models on CIFAR-100 with Hugging Face Accelerate: same result on any topology."""
