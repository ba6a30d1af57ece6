"""Training data: data sets (Fashion-MNIST, CIFAR, image folders), normalisation, and the task hierarchy."""
