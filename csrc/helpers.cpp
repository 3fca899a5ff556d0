// Dataset index helpers (pybind11), with Megatron-LM's semantics.
//
//   build_sample_idx(sizes int32[num_docs], doc_idx int32[n], seq_length, num_epochs, tokens_per_epoch)
//       -> int32[num_samples + 1, 2]  rows of (position in doc_idx, token offset in that document)
//   build_blending_indices(dataset_index uint8[size], dataset_sample_index int64[size],
//                          weights float64[num_datasets], num_datasets, size, verbose)   fills in place

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

// Samples are seq_length + 1 tokens long over the documents concatenated in doc_idx order; consecutive
// samples share one token, so sample k starts at global token k * seq_length.
py::array build_sample_idx(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes_,
                           const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& doc_idx_,
                           const int32_t seq_length, const int32_t num_epochs,
                           const int64_t tokens_per_epoch) {
  if (seq_length <= 1) throw std::invalid_argument("build_sample_idx: seq_length must be > 1");
  if (num_epochs <= 0) throw std::invalid_argument("build_sample_idx: num_epochs must be > 0");
  if (tokens_per_epoch <= 1) throw std::invalid_argument("build_sample_idx: tokens_per_epoch must be > 1");
  if (sizes_.ndim() != 1 || doc_idx_.ndim() != 1)
    throw std::invalid_argument("build_sample_idx: sizes and doc_idx must be 1-D");

  auto sizes = sizes_.unchecked<1>();
  auto doc_idx = doc_idx_.unchecked<1>();
  const int64_t num_docs = sizes.shape(0);
  const int64_t doc_idx_len = doc_idx.shape(0);
  if (doc_idx_len > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("build_sample_idx: doc_idx longer than int32 range");

  const int64_t num_samples = (static_cast<int64_t>(num_epochs) * tokens_per_epoch - 1) / seq_length;
  auto result = py::array_t<int32_t>(std::vector<py::ssize_t>{num_samples + 1, 2});
  auto sample_idx = result.mutable_unchecked<2>();

  std::string error;
  {
    py::gil_scoped_release release;
    int64_t sample_index = 0;
    int64_t doc_idx_index = 0;
    int32_t doc_offset = 0;
    sample_idx(0, 0) = 0;
    sample_idx(0, 1) = 0;
    ++sample_index;
    while (sample_index <= num_samples && error.empty()) {
      int32_t remaining_seq_length = seq_length + 1;
      while (remaining_seq_length != 0) {
        if (doc_idx_index >= doc_idx_len) {
          error = "build_sample_idx: documents hold fewer tokens than num_epochs * tokens_per_epoch";
          break;
        }
        const int64_t doc_id = doc_idx[doc_idx_index];
        if (doc_id < 0 || doc_id >= num_docs) {
          error = "build_sample_idx: doc_idx entry " + std::to_string(doc_id) + " out of range";
          break;
        }
        const int32_t doc_length = sizes[doc_id] - doc_offset;
        remaining_seq_length -= doc_length;
        if (remaining_seq_length <= 0) {
          // The sample ends inside this document; the next one starts at its last token.
          doc_offset += (remaining_seq_length + doc_length - 1);
          remaining_seq_length = 0;
        } else {
          ++doc_idx_index;
          doc_offset = 0;
        }
      }
      sample_idx(sample_index, 0) = static_cast<int32_t>(doc_idx_index);
      sample_idx(sample_index, 1) = doc_offset;
      ++sample_index;
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return result;
}

// Greedy blending: sample i goes to the dataset whose weight * max(i, 1) - samples_taken is largest
// (first such dataset on ties); dataset_sample_index[i] is that dataset's running count.
void build_blending_indices(py::array_t<uint8_t, py::array::c_style>& dataset_index,
                            py::array_t<int64_t, py::array::c_style>& dataset_sample_index,
                            const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                            const int32_t num_datasets, const int64_t size, const bool verbose) {
  (void)verbose;  // statistics are logged by the Python wrapper
  if (num_datasets <= 0 || num_datasets > 256)
    throw std::invalid_argument("build_blending_indices: num_datasets must be in [1, 256]");
  if (dataset_index.shape(0) < size || dataset_sample_index.shape(0) < size)
    throw std::invalid_argument("build_blending_indices: output arrays shorter than size");
  if (weights.shape(0) < num_datasets)
    throw std::invalid_argument("build_blending_indices: fewer weights than num_datasets");

  auto dataset_index_ptr = dataset_index.mutable_unchecked<1>();
  auto dataset_sample_index_ptr = dataset_sample_index.mutable_unchecked<1>();
  auto weights_ptr = weights.unchecked<1>();
  std::vector<int64_t> current_samples(num_datasets, 0);

  py::gil_scoped_release release;
  for (int64_t sample_idx = 0; sample_idx < size; ++sample_idx) {
    const double sample_idx_double = std::max(static_cast<double>(sample_idx), 1.0);
    int64_t max_error_index = 0;
    double max_error = weights_ptr[0] * sample_idx_double - static_cast<double>(current_samples[0]);
    for (int64_t dataset_idx = 1; dataset_idx < num_datasets; ++dataset_idx) {
      const double error =
          weights_ptr[dataset_idx] * sample_idx_double - static_cast<double>(current_samples[dataset_idx]);
      if (error > max_error) {
        max_error = error;
        max_error_index = dataset_idx;
      }
    }
    dataset_index_ptr[sample_idx] = static_cast<uint8_t>(max_error_index);
    dataset_sample_index_ptr[sample_idx] = current_samples[max_error_index];
    current_samples[max_error_index] += 1;
  }
}

PYBIND11_MODULE(helpers_cpp, m) {
  m.doc() = "Megatron dataset index helpers";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"),
        py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"), py::arg("size"),
        py::arg("verbose"));
}
