"""perfed_tff: Personalized Federated Averaging (Per-FedAvg) on TensorFlow Federated."""

import setuptools

setuptools.setup(
    name='perfed_tff',
    version='0.3.0',
    description=('Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020) as a '
                 'TensorFlow Federated LearningProcess'),
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    classifiers=['License :: OSI Approved :: Apache Software License'],
    # The library only; experiments/ (binaries, comparisons, plots, the
    # benchmark) runs from a checkout: `python -m experiments.train`.
    packages=setuptools.find_packages(include=['perfed_tff', 'perfed_tff.*']),
    # The worker's loopback shim, compiled on first use (BUILD_NOTES.md).
    package_data={'perfed_tff.runtime': ['loopback_shim.c']},
    license_files=['LICENSE'],
    python_requires='>=3.9,<3.12',  # tensorflow-federated 0.87.0's own range
    install_requires=[
        # TFF 0.87.0 pins jax==0.4.14; where a registry lacks it, install
        # requirements/runtime.txt first and TFF with --no-deps, as
        # `./run.sh setup` does (BUILD_NOTES.md).
        'tensorflow-federated==0.87.0',
        'tensorflow>=2.14,<2.15',
        'numpy~=1.25',
        'absl-py>=1.0,<2',
        'grpcio~=1.46',
        'portpicker~=1.6',
        'scikit-learn>=1.2',   # the offline digits dataset
    ],
    extras_require={
        # Progress bars, plots and process memory for experiments/ (without
        # matplotlib the binaries write their tables and skip the plots).
        'experiments': ['tqdm~=4.64', 'matplotlib>=3.7', 'psutil>=5.9'],
        # The benchmark's PyTorch peer (CPU build: see requirements/peer.txt).
        'peer': ['torch>=2.1'],
        'test': ['pytest>=7', 'pytest-timeout>=2', 'nbclient>=0.8',
                 'nbformat>=5.9', 'ipykernel>=6', 'psutil>=5.9',
                 'matplotlib>=3.7'],
    },
)
