// SPDX-License-Identifier: MIT
// The core of bkn: tensor views, options, the Kalman steps, forward, backward, the chain, and the
// other normalization methods. Include a backend's header beside it, e.g. <bkn/backends/reference.hpp>.
#pragma once

#include "bkn/backend.hpp"
#include "bkn/backward.hpp"
#include "bkn/chain.hpp"
#include "bkn/config.hpp"
#include "bkn/error.hpp"
#include "bkn/forward.hpp"
#include "bkn/gaussian.hpp"
#include "bkn/layer.hpp"
#include "bkn/math/kalman.hpp"
#include "bkn/math/welford.hpp"
#include "bkn/methods/batch_norm.hpp"
#include "bkn/methods/batch_renorm.hpp"
#include "bkn/methods/filter_response_norm.hpp"
#include "bkn/methods/group_norm.hpp"
#include "bkn/methods/memorized_batch_norm.hpp"
#include "bkn/options.hpp"
#include "bkn/span.hpp"
#include "bkn/steps.hpp"
#include "bkn/storage.hpp"
#include "bkn/tensor.hpp"
#include "bkn/transition.hpp"
#include "bkn/workspace.hpp"
